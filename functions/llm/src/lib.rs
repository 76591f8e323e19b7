//! `aob-llm`: the model gateway.

pub mod chat;
pub mod provider;
