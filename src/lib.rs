//! vmrestore: restore libvirt/KVM virtual machines from vmbackup + virtnbdbackup trees.
#![forbid(unsafe_code)]
pub mod restore;
pub mod domxml;
