//! TODO: objective
