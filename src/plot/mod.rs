//! TODO: plot
