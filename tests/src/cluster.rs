//! A JetStream cluster of real nats-servers on loopback, as `infra/nats/cluster` sets one
//! up (each node a `server_name`, one cluster name, routes to the others), on free ports
//! with temporary stores: for the tests and benches that need replicated streams, and the
//! fault suite that kills a stream's leader.
//!
//! Each node also serves its monitoring endpoint (`http`), so a test can read what *that*
//! node stores (`/jsz`), not what the stream's leader answers for the cluster.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use async_nats::jetstream;
use serde_json::Value;

use aob_streams::{Drift, Topology};
use aob_testkit::NatsServer;

use crate::audit::free_port;

/// One node of a [`Cluster`].
pub struct Node {
    /// The server (killed when dropped).
    pub server: NatsServer,
    /// Its `server_name`, which stream info names leaders and replicas by.
    pub name: String,
    /// Its monitoring port (`http://127.0.0.1:<port>/jsz`, `/healthz`, ...).
    pub http_port: u16,
    /// Its cluster (route) port.
    pub route_port: u16,
    running: bool,
}

/// Servers clustered on loopback; every server is killed when the cluster is dropped.
pub struct Cluster {
    /// The nodes, in the order they were started; node `i` is named `aob-<i>`.
    pub nodes: Vec<Node>,
}

impl Cluster {
    /// Starts `n` servers with JetStream routed to each other; returns once each is ready
    /// (the JetStream meta leader may still be being elected: see [`Cluster::apply`]).
    pub fn start(n: usize) -> Result<Cluster> {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_>>()?;
        let mut nodes = Vec::with_capacity(n);
        for (i, &route_port) in routes.iter().enumerate() {
            let name = format!("aob-{i}");
            let http_port = free_port()?;
            let others: Vec<String> = routes
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, p)| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            let config = format!(
                "server_name: {name}\nhttp: \"127.0.0.1:{http_port}\"\ncluster {{\n  name: aob\n  listen: \"127.0.0.1:{route_port}\"\n  routes: [{}]\n}}\n",
                others.join(", ")
            );
            let server = NatsServer::start_with_config(&config)
                .with_context(|| format!("starting cluster node {name}"))?;
            nodes.push(Node {
                server,
                name,
                http_port,
                route_port,
                running: true,
            });
        }
        Ok(Cluster { nodes })
    }

    /// Client URL of node `i`.
    pub fn url(&self, i: usize) -> String {
        self.nodes[i].server.url()
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.server.url()).collect()
    }

    /// The node with this `server_name`.
    pub fn index_of(&self, server_name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == server_name)
    }

    /// Whether node `i` runs (it was not killed, or was restarted since).
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].running
    }

    /// A client given every node's URL: it connects while any node is up, and fails over
    /// to another when its server dies.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        let urls: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.running)
            .map(|n| n.server.url())
            .collect();
        Ok(async_nats::connect(urls.as_slice()).await?)
    }

    /// A client of node `i` only (it learns the other nodes from the server, as every AOB
    /// process given one `NATS_URL` does).
    pub async fn connect_to(&self, i: usize) -> Result<async_nats::Client> {
        self.nodes[i].server.connect().await
    }

    /// Kills node `i` (SIGKILL: no goodbye to its peers or clients).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].server.stop();
        self.nodes[i].running = false;
    }

    /// Starts killed node `i` again on its ports and store.
    pub fn restart(&mut self, i: usize) -> Result<()> {
        self.nodes[i].server.start_again()?;
        self.nodes[i].running = true;
        Ok(())
    }

    /// Applies `topology`, retrying while the cluster elects its JetStream meta leader
    /// (within seconds of forming) or a stream its leader; gives up after `guard`.
    pub async fn apply(
        &self,
        js: &jetstream::Context,
        topology: &Topology,
        guard: Duration,
    ) -> Result<Vec<Drift>> {
        let deadline = tokio::time::Instant::now() + guard;
        loop {
            match topology.apply(js).await {
                Ok(drift) => return Ok(drift),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    bail!("the topology was not applied to the cluster within {guard:?}: {e}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// The node that leads `stream` (a stream, or `KV_<bucket>`), waiting up to `guard`
    /// while it has none (an election).
    pub async fn leader(
        &self,
        js: &jetstream::Context,
        stream: &str,
        guard: Duration,
    ) -> Result<usize> {
        let deadline = tokio::time::Instant::now() + guard;
        loop {
            let last = match stream_cluster(js, stream).await {
                Ok(Some(c)) => match c.leader.as_deref() {
                    Some(name) => {
                        return self
                            .index_of(name)
                            .with_context(|| format!("{stream} is led by unknown server {name}"));
                    }
                    None => format!("no leader: {c:?}"),
                },
                Ok(None) => "no cluster information (not replicated?)".to_string(),
                Err(e) => e.to_string(),
            };
            if tokio::time::Instant::now() >= deadline {
                bail!("{stream} had no leader within {guard:?}: {last}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// What node `i` itself stores of `stream`: the stream's entry in its `/jsz` (with
    /// `state.messages`, `state.last_seq`, `cluster`), or `None` if it holds no replica.
    pub async fn local_stream(&self, i: usize, stream: &str) -> Result<Option<Value>> {
        let url = format!(
            "http://127.0.0.1:{}/jsz?accounts=true&streams=true",
            self.nodes[i].http_port
        );
        let jsz: Value = reqwest::get(&url)
            .await
            .with_context(|| format!("GET {url}"))?
            .json()
            .await
            .with_context(|| format!("reading {url}"))?;
        let found = jsz["account_details"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|a| a["stream_detail"].as_array().into_iter().flatten())
            .find(|s| s["name"] == stream)
            .cloned();
        Ok(found)
    }

    /// Waits until node `i` (restarted) stores what the leader of each of `streams` has:
    /// the leader lists it as a current replica, and its own store ends at the leader's
    /// last sequence. Gives up after `guard`.
    pub async fn caught_up(
        &self,
        i: usize,
        js: &jetstream::Context,
        streams: &[&str],
        guard: Duration,
    ) -> Result<()> {
        let deadline = tokio::time::Instant::now() + guard;
        let name = &self.nodes[i].name;
        for stream in streams {
            loop {
                let why = match self.behind(i, js, stream).await {
                    Ok(None) => break,
                    Ok(Some(why)) => why,
                    Err(e) => e.to_string(),
                };
                if tokio::time::Instant::now() >= deadline {
                    bail!("{name} did not catch up on {stream} within {guard:?}: {why}");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    /// Why node `i` is not caught up on `stream`, or `None` when it is.
    async fn behind(
        &self,
        i: usize,
        js: &jetstream::Context,
        stream: &str,
    ) -> Result<Option<String>> {
        let name = &self.nodes[i].name;
        let mut s = js.get_stream(stream).await?;
        let info = s.info().await?;
        let cluster = info.cluster.clone().context("no cluster information")?;
        if cluster.leader.as_deref() != Some(name.as_str()) {
            match cluster.replicas.iter().find(|p| &p.name == name) {
                Some(p) if p.current && !p.offline => {}
                Some(p) => return Ok(Some(format!("replica not current: {p:?}"))),
                None => return Ok(Some(format!("not a replica: {cluster:?}"))),
            }
        }
        let want = info.state.last_sequence;
        let local = self.local_stream(i, stream).await?;
        let have = local
            .as_ref()
            .and_then(|l| l["state"]["last_seq"].as_u64())
            .unwrap_or(0);
        Ok((have != want).then(|| format!("its store ends at {have}, the leader's at {want}")))
    }
}

/// A stream's cluster information, as its leader answers.
async fn stream_cluster(
    js: &jetstream::Context,
    stream: &str,
) -> Result<Option<jetstream::stream::ClusterInfo>> {
    let mut s = js.get_stream(stream).await?;
    Ok(s.info().await?.cluster.clone())
}
