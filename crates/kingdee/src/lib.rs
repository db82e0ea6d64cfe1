//! The Kingdee Cloud Xingchen V2 (金蝶云星辰 V2) open API: request signing, the app-token flow, a
//! rate-budgeted, retrying gateway client, and list pages checked against their counts.

pub mod gateway;
pub mod list;
pub mod sign;

pub use gateway::{Credentials, Gateway, GatewayError, KingdeeArgs, RateBudget, Unlimited};
pub use list::{ListData, Page};
