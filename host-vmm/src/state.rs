//! Device and VM state as data: what snapshot/restore and live migration serialize.
//!
//! Every device and every piece of host-side VM state implements [`Persist`]: `save` returns
//! a plain, typed, serde-serializable structure; `restore` loads one into a freshly built
//! instance of the same thing (built from the same configuration), after checking it. A state
//! structure may come from a file or a socket, so `restore` treats it as untrusted input: it
//! validates every index, length and address and fails with a [`StateError`] instead of
//! panicking or leaving a half-restored object behind.
//!
//! Handles (fds, threads, guest memory mappings) are not state: the builder recreates them,
//! and `restore` fills in what they hold.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Version of the state format. Bump it when any state structure changes incompatibly; a
/// reader refuses other versions ([`check_version`]).
pub const STATE_VERSION: u32 = 1;

/// Something whose state can be written out and read back.
pub trait Persist {
    /// The state as data.
    type State: Serialize + DeserializeOwned + std::fmt::Debug + Clone + PartialEq;

    /// The current state. Called at an exit boundary, with the vCPU parked and the devices
    /// paused ([`crate::vm::VmHandle::save_machine`] does both).
    fn save(&self) -> Self::State;

    /// Loads `state` into this (freshly built) instance. On error, `self` is left as it was
    /// or in its freshly built state, never half-restored in a way that matters to the guest.
    fn restore(&mut self, state: &Self::State) -> Result<(), StateError>;
}

/// Why a state structure cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The state was written by another format version.
    #[error("state format version {found}, this host-vmm reads version {expected}")]
    Version {
        /// Version in the state.
        found: u32,
        /// [`STATE_VERSION`].
        expected: u32,
    },
    /// A value in the state is out of range or inconsistent.
    #[error("invalid {what} state: {why}")]
    Invalid {
        /// Which state (e.g. "page-table pool").
        what: &'static str,
        /// What is wrong.
        why: String,
    },
    /// The state describes a differently configured VM (e.g. another RAM size or device set).
    #[error("{what} state does not match this VM: {why}")]
    Mismatch {
        /// Which state.
        what: &'static str,
        /// What differs.
        why: String,
    },
}

impl StateError {
    /// An [`StateError::Invalid`] for `what`.
    pub fn invalid(what: &'static str, why: impl Into<String>) -> StateError {
        StateError::Invalid {
            what,
            why: why.into(),
        }
    }

    /// A [`StateError::Mismatch`] for `what`.
    pub fn mismatch(what: &'static str, why: impl Into<String>) -> StateError {
        StateError::Mismatch {
            what,
            why: why.into(),
        }
    }
}

/// Fails unless `found` is [`STATE_VERSION`].
pub fn check_version(found: u32) -> Result<(), StateError> {
    if found == STATE_VERSION {
        Ok(())
    } else {
        Err(StateError::Version {
            found,
            expected: STATE_VERSION,
        })
    }
}

/// Test helper: `save`, serialize to JSON, parse back, `restore` into `fresh`, and check that
/// `fresh` now saves the same state. Returns the JSON for further checks.
#[cfg(test)]
pub(crate) fn assert_round_trip<T: Persist>(original: &T, fresh: &mut T) -> String {
    let state = original.save();
    let json = serde_json::to_string(&state).expect("state serializes");
    let back: T::State = serde_json::from_str(&json).expect("state deserializes");
    assert_eq!(back, state, "JSON round trip changed the state");
    fresh.restore(&back).expect("restore accepts saved state");
    assert_eq!(
        fresh.save(),
        state,
        "restored instance saves a different state"
    );
    json
}
