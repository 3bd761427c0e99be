//! TODO: tokenize
