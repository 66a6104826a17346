//! A polled 16550A UART driver: the trapped twin of `console_write`.
//!
//! It transmits like Linux's 8250 driver with `tx_loadsz = 16`: before each group of up to 16
//! bytes it polls the line status register until the transmit FIFO is empty (THRE), then writes
//! the group to THR without polling. Under a VMM every register access is one exit, so sending
//! `n` bytes costs `n` THR writes plus one LSR read per group of 16 (more if THRE is clear
//! when polled). Bytes are sent as they are: no `\n` → `\r\n` translation.

use core::arch::asm;
use core::fmt;

pub use hypercall_abi::ports::UART_COM1;
use x86_64::instructions::port::Port;

/// Transmit holding register (write, DLAB = 0).
const THR: u16 = 0;
/// Divisor latch low byte (DLAB = 1).
const DLL: u16 = 0;
/// Interrupt enable register (DLAB = 0).
const IER: u16 = 1;
/// Divisor latch high byte (DLAB = 1).
const DLM: u16 = 1;
/// FIFO control register (write).
const FCR: u16 = 2;
/// Line control register.
const LCR: u16 = 3;
/// Modem control register.
const MCR: u16 = 4;
/// Line status register.
const LSR: u16 = 5;

/// LCR: divisor latch access bit.
const LCR_DLAB: u8 = 0x80;
/// LCR: 8 data bits, no parity, 1 stop bit.
const LCR_8N1: u8 = 0x03;
/// FCR: enable FIFOs, clear both, 14-byte receive trigger.
const FCR_ENABLE_CLEAR_14: u8 = 0xC7;
/// MCR: DTR, RTS, OUT2.
const MCR_DTR_RTS_OUT2: u8 = 0x0B;
/// LSR: transmit holding register (FIFO) empty.
const LSR_THRE: u8 = 1 << 5;
/// Divisor for 115200 baud (1.8432 MHz / 16 / 115200).
const DIVISOR_115200: u16 = 1;

/// Depth of the 16550A transmit FIFO.
pub const TX_FIFO_SIZE: u8 = 16;

/// A 16550A UART at an I/O port base, transmit only.
#[derive(Debug)]
pub struct Uart16550 {
    /// Invariant: `base..base + 8` is a 16550-compatible UART, or ports nothing answers.
    base: u16,
    /// Bytes that can still go into the TX FIFO without polling LSR first.
    tx_room: u8,
}

impl Uart16550 {
    /// COM1 ([`UART_COM1`], `0x3f8`), which pvkit emulates. Not initialised: call
    /// [`init`](Self::init).
    ///
    /// Safe because `0x3f8..0x400` is the legacy COM1 range on every PC-compatible machine: the
    /// ports hold a UART or nothing.
    pub const fn com1() -> Uart16550 {
        Uart16550 {
            base: UART_COM1,
            tx_room: 0,
        }
    }

    /// A UART at `base`. Not initialised: call [`init`](Self::init).
    ///
    /// # Safety
    /// `base..base + 8` must be the registers of a 16550-compatible UART, or unused ports.
    pub const unsafe fn new(base: u16) -> Uart16550 {
        Uart16550 { base, tx_room: 0 }
    }

    /// The I/O port base.
    pub const fn base(&self) -> u16 {
        self.base
    }

    /// Programs the UART: interrupts off, 115200 baud, 8N1, FIFOs on and cleared, DTR/RTS/OUT2.
    pub fn init(&mut self) {
        self.write_reg(IER, 0x00);
        self.write_reg(LCR, LCR_DLAB);
        self.write_reg(DLL, DIVISOR_115200 as u8);
        self.write_reg(DLM, (DIVISOR_115200 >> 8) as u8);
        self.write_reg(LCR, LCR_8N1);
        self.write_reg(FCR, FCR_ENABLE_CLEAR_14);
        self.write_reg(MCR, MCR_DTR_RTS_OUT2);
        self.tx_room = 0;
    }

    /// Sends one byte. Polls LSR for THRE first if the current group of
    /// [`TX_FIFO_SIZE`] bytes is used up.
    #[inline]
    pub fn write_byte(&mut self, byte: u8) {
        if self.tx_room == 0 {
            self.flush();
        }
        self.write_reg(THR, byte);
        self.tx_room -= 1;
    }

    /// Sends every byte of `bytes`, with exactly the port accesses of calling
    /// [`write_byte`](Self::write_byte) for each: fill the room left in the FIFO, then for each
    /// further group of up to [`TX_FIFO_SIZE`] bytes poll LSR once (until THRE) and write the
    /// group to THR.
    ///
    /// A group goes out in one asm loop of 3 instructions per byte (`lodsb`, `out dx, al`,
    /// `loop`): no per-byte call, room check or bounds check, so a timing of it measures the
    /// exits rather than the guest's own work.
    pub fn write_bytes(&mut self, bytes: &[u8]) {
        let thr = self.base.wrapping_add(THR);
        let mut rest = bytes;
        while !rest.is_empty() {
            if self.tx_room == 0 {
                self.flush();
            }
            let (group, tail) = rest.split_at(rest.len().min(usize::from(self.tx_room)));
            // SAFETY: by the struct invariant `base + THR` is the THR of a 16550 UART or an
            // unused port; writing it has no effect on memory.
            unsafe { out_bytes(thr, group) };
            // `group.len() <= tx_room <= TX_FIFO_SIZE`, so this fits in `u8` and never wraps.
            self.tx_room -= group.len() as u8;
            rest = tail;
        }
    }

    /// Waits until the transmit FIFO is empty (LSR.THRE), so that the next
    /// [`TX_FIFO_SIZE`] bytes go out without polling.
    ///
    /// Use it before a measured section to make its port-access count independent of what was
    /// sent before.
    pub fn flush(&mut self) {
        while self.read_reg(LSR) & LSR_THRE == 0 {
            core::hint::spin_loop();
        }
        self.tx_room = TX_FIFO_SIZE;
    }

    #[inline]
    fn write_reg(&mut self, reg: u16, value: u8) {
        let mut port = Port::<u8>::new(self.base.wrapping_add(reg));
        // SAFETY: by the struct invariant `base + reg` (reg < 8) is a register of a 16550 UART
        // or an unused port; writing a UART register has no effect on memory.
        unsafe { port.write(value) }
    }

    #[inline]
    fn read_reg(&mut self, reg: u16) -> u8 {
        let mut port = Port::<u8>::new(self.base.wrapping_add(reg));
        // SAFETY: as in `write_reg`; reading LSR has no side effect beyond clearing error bits.
        unsafe { port.read() }
    }
}

impl fmt::Write for Uart16550 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.write_bytes(s.as_bytes());
        Ok(())
    }
}

/// Writes each byte of `bytes`, in order, to `port` with an 8-bit `out`; nothing for an empty
/// slice.
///
/// # Safety
/// Writing any byte to `port` must be harmless, with no effect on memory.
#[inline]
unsafe fn out_bytes(port: u16, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: `rsi..rsi + rcx` is the live, initialised slice `bytes` (`rcx` >= 1, checked above,
    // so `loop` stops after exactly `bytes.len()` iterations); `lodsb` only reads it and steps
    // `rsi` forward (DF is clear on entry to an asm block). The `out`s are harmless by the
    // caller's contract. No stack use; `lodsb`, `out` and `loop` leave the flags unchanged.
    unsafe {
        asm!(
            "2:",
            "lodsb",
            "out dx, al",
            "loop 2b",
            inout("rsi") bytes.as_ptr() => _,
            inout("rcx") bytes.len() => _,
            in("dx") port,
            out("al") _,
            options(readonly, nostack, preserves_flags),
        );
    }
}
