//! Trainable decoder-only transformers and their loading, generation and saving.
