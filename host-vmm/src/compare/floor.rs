//! The floor: the cheapest possible exit loops, as hand-written machine code, which the `null`
//! workload's loops are compared with.

use hypercall_abi::HYPERCALL_PORT;
use hypercall_abi::boot::Mode;
use hypercall_abi::layout::KERNEL_MIN_GPA;
use hypercall_abi::ports::{EXIT_PORT, MARKER_BEGIN, MARKER_END, MARKER_PORT, NULL_PORT};

use super::error::CompareError;
use super::record::{Record, RunView, record_from_window};
use super::window::measure;
use super::workloads::CompareOptions;
use crate::config::{KernelImage, VmConfig};
use crate::console::ConsoleSink;

/// Workload name of the floor reference records.
pub const FLOOR_WORKLOAD: &str = "floor";

/// The floor: the cheapest possible exit loop, as hand-written machine code (the same loop a C
/// KVM probe would run), measured in the same process as the workloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Floor {
    /// `out` to the trapped null device.
    Pio,
    /// `out` to the hypercall port with `rax` = `null`.
    Hypercall,
}

impl Floor {
    /// The record's `mode`.
    pub fn name(self) -> &'static str {
        match self {
            Floor::Pio => "raw-pio",
            Floor::Hypercall => "raw-hypercall",
        }
    }

    /// `floor/<name>`, naming the run in errors.
    fn run_name(self) -> String {
        format!("{FLOOR_WORKLOAD}/{}", self.name())
    }

    fn port(self) -> u16 {
        match self {
            Floor::Pio => NULL_PORT,
            Floor::Hypercall => HYPERCALL_PORT,
        }
    }
}

/// Machine code of the floor guest: begin marker; `ops` times `mov edx, PORT; out dx, eax;
/// dec ecx; jnz` with `eax` = 0 (the `null` call, whose status 0 keeps `eax` at 0); end
/// marker; exit 0. `ops` must be at least 1.
pub fn floor_guest(floor: Floor, ops: u32) -> Vec<u8> {
    let mov_edx = |port: u16| {
        let p = u32::from(port).to_le_bytes();
        [0xba, p[0], p[1], p[2], p[3]]
    };
    let mut c = Vec::new();
    for (marker, body) in [(MARKER_BEGIN, true), (MARKER_END, false)] {
        c.extend(mov_edx(MARKER_PORT));
        c.push(0xb8); // mov eax, imm32
        c.extend(marker.to_le_bytes());
        c.push(0xef); // out dx, eax
        if body {
            c.push(0xb9); // mov ecx, imm32
            c.extend(ops.to_le_bytes());
            c.extend([0x31, 0xc0]); // xor eax, eax
            c.extend(mov_edx(floor.port()));
            c.extend([0xef, 0xff, 0xc9, 0x75, 0xf6]); // out dx, eax; dec ecx; jnz -10
        }
    }
    c.extend([0x31, 0xc0]); // xor eax, eax
    c.extend(mov_edx(EXIT_PORT));
    c.push(0xef);
    c
}

/// Runs the floor guest and checks that every iteration was exactly one exit of its kind.
pub fn run_floor(opts: &CompareOptions, floor: Floor, ops: u64) -> Result<Record, CompareError> {
    let ops32 = u32::try_from(ops.max(1)).unwrap_or(u32::MAX);
    let image = crate::loader::minimal_elf(KERNEL_MIN_GPA, &floor_guest(floor, ops32), 0x1000);
    let cfg = VmConfig {
        kernel: KernelImage {
            name: "floor guest".into(),
            bytes: image.into(),
        },
        // The hypercall floor needs the port served; the PIO floor is an unmodified guest.
        mode: match floor {
            Floor::Pio => Mode::Trapped,
            Floor::Hypercall => Mode::Pv,
        },
        disable: 0,
        mem_size: opts.mem_size,
        workload: String::new(),
        args: Vec::new(),
        kvm_device: opts.kvm_device.clone(),
        disk: None,
        virtio_console: false,
        timeout: None,
        seccomp: true,
    };
    let report = measure(&cfg, ConsoleSink::new(None)).map_err(|source| CompareError::Vmm {
        run: floor.run_name(),
        source,
    })?;
    floor_record(floor, u64::from(ops32), RunView::of(&report))
}

/// The record of a floor run that made `ops` iterations, if each was exactly one exit of its
/// kind and the guest exited with 0.
pub fn floor_record(floor: Floor, ops: u64, run: RunView<'_>) -> Result<Record, CompareError> {
    let name = floor.run_name();
    if let Some(reason) = run.stopped {
        return Err(CompareError::Stopped { run: name, reason });
    }
    let window = run.window(&name)?;
    let counted = match floor {
        Floor::Pio => window.exits.by_device.get("null"),
        Floor::Hypercall => window.exits.by_hypercall.get("null"),
    };
    if run.exit_code != 0 || window.exits.total != ops || counted != Some(&ops) {
        return Err(CompareError::FloorExits {
            run: name,
            expected: ops,
            kind: match floor {
                Floor::Pio => "null-port writes",
                Floor::Hypercall => "null hypercalls",
            },
            code: run.exit_code,
            saw: window.exits.summary(),
        });
    }
    Ok(record_from_window(
        FLOOR_WORKLOAD,
        floor.name(),
        ops,
        window,
        run.exit_code,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::record::tests::window;
    use crate::metrics::ExitReason;

    fn view(window: Option<&crate::metrics::Window>, exit_code: u32) -> RunView<'_> {
        RunView {
            exit_code,
            stopped: None,
            window,
            console: b"",
        }
    }

    #[test]
    fn the_floor_guest_is_the_documented_machine_code() {
        let c = floor_guest(Floor::Hypercall, 5);
        let port = u32::from(HYPERCALL_PORT).to_le_bytes();
        let body = [
            0xb9, 5, 0, 0, 0, // mov ecx, 5
            0x31, 0xc0, // xor eax, eax
            0xba, port[0], port[1], port[2], port[3], // mov edx, port
            0xef, 0xff, 0xc9, 0x75, 0xf6, // out; dec ecx; jnz -10 (to the mov edx)
        ];
        assert!(c.windows(body.len()).any(|w| w == body), "{c:x?}");
        // The jump lands on `mov edx`: 10 bytes back from the end of the jnz.
        assert_eq!(body.len() - 10, 7);
        assert_eq!(body[7], 0xba);
        // Ends with the exit port write.
        assert_eq!(c[c.len() - 1], 0xef);
        let pio = floor_guest(Floor::Pio, 5);
        let p = u32::from(NULL_PORT).to_le_bytes();
        assert!(pio.windows(5).any(|w| w == [0xba, p[0], p[1], p[2], p[3]]));
        assert_eq!(Floor::Pio.name(), "raw-pio");
        assert_eq!(Floor::Hypercall.name(), "raw-hypercall");
    }

    #[test]
    fn a_floor_run_must_be_one_exit_per_iteration() {
        let good = window(1_000, 4);
        let r = floor_record(Floor::Hypercall, 4, view(Some(&good), 0)).unwrap();
        assert_eq!(
            (r.workload.as_str(), r.mode.as_str(), r.ops),
            ("floor", "raw-hypercall", 4)
        );
        assert_eq!(r.checksum, None);

        let e = floor_record(Floor::Hypercall, 5, view(Some(&good), 0)).unwrap_err();
        let m = e.to_string();
        assert!(
            m.starts_with(
                "floor/raw-hypercall: expected 5 exits, all of them null hypercalls, and exit \
                 code 0; saw exit code 0, exits: total=4"
            ),
            "{m}"
        );
        // Hypercalls are not null-port writes.
        let e = floor_record(Floor::Pio, 4, view(Some(&good), 0)).unwrap_err();
        assert!(matches!(e, CompareError::FloorExits { .. }), "{e}");
        let e = floor_record(Floor::Hypercall, 4, view(Some(&good), 1)).unwrap_err();
        assert!(e.to_string().contains("saw exit code 1"), "{e}");
        let e = floor_record(Floor::Pio, 4, view(None, 0)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "floor/raw-pio: no measured window (the guest did not write the begin and end markers)"
        );

        let mut pio = window(1_000, 0);
        for _ in 0..3 {
            pio.exits.record(ExitReason::Pio);
            pio.exits.record_device("null");
        }
        assert!(floor_record(Floor::Pio, 3, view(Some(&pio), 0)).is_ok());
    }
}
