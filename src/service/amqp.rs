//! RabbitMQ: the server publishes the id of each queued build to one durable queue; workers
//! consume it with prefetch 1. The queue only hands out work: a worker acknowledges a message as
//! soon as it has asked the server for the build (a build that is not queued any more is
//! skipped), and the lease in the job store decides everything after. Delivery is at least once:
//! the server publishes every queued build again whenever it (re)connects.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, Consumer};
use tokio::sync::mpsc;

use super::Service;

/// The queue builds are published to.
pub const QUEUE: &str = "debimg.builds";

/// Opens a channel on `url` with the builds queue declared (durable).
pub async fn channel(url: &str) -> Result<(Connection, Channel)> {
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to RabbitMQ at {}", crate::redact::text(url)))?;
    let channel = conn
        .create_channel()
        .await
        .context("opening an AMQP channel")?;
    channel
        .queue_declare(
            QUEUE.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("declaring the queue {QUEUE}"))?;
    Ok((conn, channel))
}

/// A consumer of the builds queue, one message at a time.
pub async fn consumer(channel: &Channel, tag: &str) -> Result<Consumer> {
    channel
        .basic_qos(1, BasicQosOptions::default())
        .await
        .context("setting prefetch 1")?;
    channel
        .basic_consume(
            QUEUE.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming {QUEUE}"))
}

/// Publishes build ids from the service, reconnecting as needed.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::UnboundedSender<String>,
}

impl Publisher {
    /// Queues build `id` for publishing.
    pub fn publish(&self, id: &str) {
        let _ = self.tx.send(id.to_string());
    }

    /// Starts publishing to `url` on the current runtime; every queued build of `service` is
    /// published on each (re)connection.
    pub fn start(url: String, service: Arc<Service>) -> Publisher {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        tokio::spawn(async move {
            let mut pending: Option<String> = None;
            loop {
                let result: Result<()> = async {
                    let (_conn, channel) = channel(&url).await?;
                    channel
                        .confirm_select(ConfirmSelectOptions::default())
                        .await
                        .context("asking for publisher confirms")?;
                    let queued = service.store.queued_builds()?;
                    tracing::info!(
                        "RabbitMQ: connected; publishing the {} queued build(s)",
                        queued.len()
                    );
                    for id in queued {
                        publish(&channel, &id).await?;
                    }
                    if let Some(id) = pending.take() {
                        publish(&channel, &id).await?;
                    }
                    while let Some(id) = rx.recv().await {
                        pending = Some(id.clone());
                        publish(&channel, &id).await?;
                        pending = None;
                    }
                    Ok(())
                }
                .await;
                match result {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::warn!("RabbitMQ: {e:#}; connecting again in 2 s");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            }
        });
        Publisher { tx }
    }
}

async fn publish(channel: &Channel, id: &str) -> Result<()> {
    let confirm = channel
        .basic_publish(
            "".into(),
            QUEUE.into(),
            BasicPublishOptions::default(),
            id.as_bytes(),
            // Persistent: the message survives a restart of RabbitMQ.
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .with_context(|| format!("publishing build {id}"))?
        .await
        .with_context(|| format!("publishing build {id}"))?;
    anyhow::ensure!(confirm.is_ack(), "RabbitMQ refused build {id}");
    Ok(())
}
