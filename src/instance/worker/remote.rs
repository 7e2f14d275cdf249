//! The servers of a remote model: checked and chosen as the instance's replicas.

use std::time::Instant;

use super::Worker;
use crate::backend::client::Client;
use crate::error::Error;
use crate::instance::policy::ReplicaHealth;
use crate::model::Remote;

/// One server of a remote model.
pub(super) struct Replica {
    pub(super) client: Client,
    pub(super) health: ReplicaHealth,
}

impl Worker {
    /// For a remote model: checks every replica, keeps them all, and is ready when one answers.
    pub(super) fn connect_remote(&mut self, remote: &Remote) -> Result<(), Error> {
        let token = remote.api_key_env.as_deref().and_then(|name| std::env::var(name).ok());
        let roots = match &remote.ca_file {
            Some(path) => Some(Client::load_ca_file(path).map_err(|reason| Error::BadConfig {
                path: path.clone(),
                reason: format!("ca_file of {}: {reason}", self.spec.name),
            })?),
            None => None,
        };
        let mut replicas = Vec::new();
        let mut problems = Vec::new();
        for url in &remote.urls {
            let client = Client::for_url(url, token.as_deref(), roots.as_ref(), self.services.http);
            let health = client.remote_healthy();
            if let Err(problem) = &health {
                problems.push(format!("{url}: {problem}"));
            }
            replicas.push(Replica { health: ReplicaHealth::checked(health.is_ok(), Instant::now()), client });
        }
        if replicas.iter().all(|r| r.health.down_until.is_some()) {
            return Err(Error::RemoteDown {
                message: format!("no server for {} answers: {}", self.spec.name, problems.join("; ")),
            });
        }
        self.machine.set_slots(self.spec.load.parallel * replicas.len() as u32);
        self.replicas = replicas;
        Ok(())
    }
}
