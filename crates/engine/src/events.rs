//! `docker events`: what happened to containers and images, as a live
//! stream and a bounded history for `--since`.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bollard_stubs::models::{
    EventActor, EventMessage, EventMessageScopeEnum, EventMessageTypeEnum,
};
use tokio::sync::broadcast;

/// Events kept for `--since`.
const HISTORY: usize = 1024;

/// The event bus of one daemon.
pub struct Events {
    tx: broadcast::Sender<EventMessage>,
    recent: Mutex<VecDeque<EventMessage>>,
}

impl Default for Events {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
            recent: Mutex::new(VecDeque::with_capacity(HISTORY)),
        }
    }
}

impl Events {
    /// Publishes one event.
    pub fn emit(
        &self,
        typ: EventMessageTypeEnum,
        action: &str,
        id: &str,
        attributes: HashMap<String, String>,
    ) {
        let now = chrono::Utc::now();
        let msg = EventMessage {
            typ: Some(typ),
            action: Some(action.to_string()),
            actor: Some(EventActor {
                id: Some(id.to_string()),
                attributes: Some(attributes),
            }),
            scope: Some(EventMessageScopeEnum::LOCAL),
            time: Some(now.timestamp()),
            time_nano: now.timestamp_nanos_opt(),
        };
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == HISTORY {
                r.pop_front();
            }
            r.push_back(msg.clone());
        }
        let _ = self.tx.send(msg);
    }

    /// The kept history and a receiver of what comes next, with nothing
    /// lost or repeated in between.
    pub fn subscribe(&self) -> (Vec<EventMessage>, broadcast::Receiver<EventMessage>) {
        let r = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let rx = self.tx.subscribe();
        (r.iter().cloned().collect(), rx)
    }
}
