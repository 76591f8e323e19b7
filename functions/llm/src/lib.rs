//! `aob-llm`: the model gateway.

pub mod breaker;
pub mod chat;
pub mod config;
pub mod gateway;
pub mod handler;
pub mod kv;
pub mod ledger;
pub mod limits;
pub mod policy;
pub mod provider;
pub mod record;
