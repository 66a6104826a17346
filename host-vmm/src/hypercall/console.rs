//! `console_write(gpa, len)`: the PV console. One exit for up to `CONSOLE_WRITE_MAX` bytes,
//! where the trapped UART costs one exit per byte.

use hypercall_abi::{CONSOLE_WRITE_MAX, Error as AbiError, Return};
use vm_memory::Bytes;

use crate::console::ConsoleSink;
use crate::memory::GuestRam;

/// Copies `len` bytes at guest-physical `gpa` to the console. Returns the byte count.
pub fn write(ram: &GuestRam, console: &ConsoleSink, gpa: u64, len: u64) -> Return {
    if len > CONSOLE_WRITE_MAX {
        return Return::err(AbiError::TooLarge);
    }
    let Some(addr) = ram.checked_range(gpa, len) else {
        return Return::err(AbiError::BadAddress);
    };
    let mut buf = vec![0u8; len as usize];
    if ram.mem().read_slice(&mut buf, addr).is_err() {
        return Return::err(AbiError::BadAddress);
    }
    console.push(&buf);
    Return::ok(len)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;

    #[test]
    fn writes_guest_bytes() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let sink = ConsoleSink::new(None);
        ram.mem()
            .write_slice(b"hello", GuestAddress(0x30_0000))
            .unwrap();
        assert_eq!(write(&ram, &sink, 0x30_0000, 5), Return::ok(5));
        assert_eq!(write(&ram, &sink, 0x30_0000, 0), Return::ok(0));
        assert_eq!(sink.captured(), b"hello");
    }

    #[test]
    fn rejects_ranges_outside_ram_and_oversize() {
        let ram = GuestRam::new(16 << 20).unwrap();
        let sink = ConsoleSink::new(None);
        let end = 16u64 << 20;
        assert_eq!(
            write(&ram, &sink, end - 2, 4),
            Return::err(AbiError::BadAddress)
        );
        assert_eq!(
            write(&ram, &sink, end, 1),
            Return::err(AbiError::BadAddress)
        );
        assert_eq!(
            write(&ram, &sink, u64::MAX - 1, 4),
            Return::err(AbiError::BadAddress)
        );
        assert_eq!(
            write(&ram, &sink, 0, CONSOLE_WRITE_MAX + 1),
            Return::err(AbiError::TooLarge)
        );
        assert_eq!(
            write(&ram, &sink, 0, u64::MAX),
            Return::err(AbiError::TooLarge)
        );
        assert!(sink.captured().is_empty());
    }
}
