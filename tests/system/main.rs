//! Whole-system tests: each starts its own nats-server on a free port with a temporary
//! store, the topology, the engine and the functions, and drives real runs.

mod agents;
mod audit;
mod core;
mod deploy;
mod faults;
mod flow;
mod infra;
mod kb;
mod people;
mod policy;
mod robustness;
mod secrets;
mod tools;
mod topology;
