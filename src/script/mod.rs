//! TODO: script
