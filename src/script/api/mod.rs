//! Registration of every script function, one file per concern of the library.

pub mod checkpoint;
pub mod data;
pub mod eval;
pub mod host;
pub mod model;
pub mod opts;
pub mod plot;
pub mod tensor;
pub mod train;
pub mod train_loop;

use std::rc::Rc;

use super::engine::HostContext;
use super::registry::Api;

/// Registers the whole API into `api`: the single place where scripts' functions come from.
pub fn register_all(api: &mut Api, ctx: &Rc<HostContext>) {
    host::register(api, ctx);
    tensor::register(api, ctx);
    model::register(api, ctx);
    data::register(api, ctx);
    train::register(api, ctx);
    checkpoint::register(api, ctx);
    train_loop::register(api, ctx);
    plot::register(api, ctx);
    eval::register(api, ctx);
}
