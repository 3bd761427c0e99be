//! TODO: disc
