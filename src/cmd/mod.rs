//! One module per command. Commands print user-facing output with
//! [`crate::ui::write_stdout`] and diagnostics with `tracing`; they never pick exit codes
//! themselves (they return `AppError`s).

pub mod all;
pub mod dump;
pub mod list;
pub mod points;
pub mod restore;
pub mod verify;
