//! The Kingdee Cloud Xingchen V2 (金蝶云星辰 V2) open API: request signing, the app-token flow, a
//! rate-budgeted, retrying gateway client, and list pages checked against their counts.

mod account;
mod answer;
pub mod gateway;
pub mod list;
mod settings;
pub mod sign;

pub use gateway::{Gateway, GatewayError, RateBudget, Unlimited};
pub use list::{ListData, Page};
pub use settings::{Credentials, KingdeeArgs};
