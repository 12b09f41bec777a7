# The test guest's data pattern: 4 MiB, 8192 sectors of 512 bytes, each naming its
# number (a misplaced or stale sector changes the checksum). The guest writes it at
# 1 MiB of its data disk on the first boot; the e2e tier runs the same program on the
# host (busybox awk) to know what the guest must report.
BEGIN {
    for (i = 0; i < 8192; i++)
        printf "%-511s\n", sprintf("vmrestore test guest pattern sector %05d of 8192", i)
}
