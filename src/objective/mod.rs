//! Training objectives: sequence log-probabilities, DPO-family and SimPO losses, and GANPO's
//! relativistic adversarial losses with their moving-average means.

pub mod ganpo;
pub mod logps;
pub mod preference;

pub use ganpo::{MeanKey, MovingMeans};
pub use logps::{sequence_logps, sequence_logps_composed, SequenceLogps};
pub use preference::{preference_loss, PreferenceConfig, PreferenceLossKind};
