//! vmrestore: restore libvirt/KVM virtual machines from vmbackup + virtnbdbackup trees.
#![deny(unsafe_code)]
pub mod restore;
pub mod domxml;
pub mod hypervisor;
