//! The restore engine (filled in by the engine issue).
