//! The Kingdee Cloud Xingchen V2 (金蝶云星辰 V2) open API: request signing, the app-token flow, a
//! rate-budgeted, retrying gateway client, and a list endpoint as a source of the sync engine.

mod account;
mod answer;
pub mod gateway;
pub mod list;
mod settings;
pub mod sign;
mod source;

pub use gateway::{Gateway, GatewayError};
pub use list::ListData;
pub use settings::{Credentials, KingdeeArgs};
pub use source::KingdeeSource;
