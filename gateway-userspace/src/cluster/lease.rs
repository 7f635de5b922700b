//! Leader election of the status writer on a `coordination.k8s.io/v1` Lease in the
//! agent's own namespace, the protocol client-go's `leaderelection` uses.
//!
//! Each round ([`Elector::round`]) reads the Lease and then, with the `resourceVersion`
//! it read (optimistic concurrency: a concurrent writer makes the update fail with 409
//! and this agent simply is not the leader this round):
//! * creates it, holding it, when it does not exist;
//! * renews it (`renewTime`) when this agent holds it;
//! * takes it over (`holderIdentity`, `acquireTime`, `leaseTransitions + 1`) when the
//!   holder let it expire (`renewTime + leaseDurationSeconds` in the past) or released
//!   it (no holder);
//! * otherwise leaves it alone.
//!
//! [`Elector::release`] clears the holder on shutdown so another agent takes over at
//! once instead of after the lease duration. Time is passed in, so the rules are tested
//! without a clock.
use std::time::Duration;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::{SignedDuration, Timestamp},
};
use kube::{
    Api, Client,
    api::{PostParams, entry::Entry},
};
use tracing::{debug, info};

/// Errors of one election round other than losing a race (which is not an error).
#[derive(Debug, thiserror::Error)]
#[error("lease {namespace}/{name}: {source}")]
pub struct LeaseError {
    pub namespace: String,
    pub name: String,
    #[source]
    pub source: kube::Error,
}

/// Who competes for which Lease, and for how long a holder keeps it.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    /// Lease name.
    pub name: String,
    /// The agent's namespace.
    pub namespace: String,
    /// This agent's identity (its node name).
    pub identity: String,
    /// How long a holder keeps the lease without renewing it.
    pub duration: Duration,
}

/// One agent's side of the election.
pub struct Elector {
    api: Api<Lease>,
    cfg: LeaseConfig,
    leading: bool,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

impl Elector {
    /// An elector for `cfg` over `client`.
    pub fn new(client: Client, cfg: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &cfg.namespace),
            cfg,
            leading: false,
        }
    }

    /// Whether the last round left this agent holding the lease.
    pub fn is_leader(&self) -> bool {
        self.leading
    }

    fn err(&self, source: kube::Error) -> LeaseError {
        LeaseError {
            namespace: self.cfg.namespace.clone(),
            name: self.cfg.name.clone(),
            source,
        }
    }

    fn duration_secs(&self) -> i32 {
        i32::try_from(self.cfg.duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// One round at time `now`: acquires, renews or leaves the lease. Returns whether
    /// this agent is the leader after it.
    pub async fn round(&mut self, now: Timestamp) -> Result<bool, LeaseError> {
        let me = self.cfg.identity.clone();
        let entry = self
            .api
            .entry(&self.cfg.name)
            .await
            .map_err(|e| self.err(e))?;
        let result = match entry {
            Entry::Vacant(v) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(me.clone()),
                        acquire_time: Some(MicroTime(now)),
                        renew_time: Some(MicroTime(now)),
                        lease_duration_seconds: Some(self.duration_secs()),
                        lease_transitions: Some(0),
                        ..LeaseSpec::default()
                    }),
                };
                let mut created = v.insert(lease);
                created.commit(&PostParams::default()).await.map(|()| true)
            }
            Entry::Occupied(mut o) => {
                let spec = o.get().spec.clone().unwrap_or_default();
                let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
                let renewed = spec.renew_time.as_ref().map(|t| t.0);
                let duration = SignedDuration::from_secs(i64::from(
                    spec.lease_duration_seconds
                        .unwrap_or_else(|| self.duration_secs()),
                ));
                let expired =
                    renewed.is_none_or(|r| r.checked_add(duration).is_ok_and(|until| until < now));
                if holder.as_deref() == Some(me.as_str()) {
                    o.get_mut().spec.get_or_insert_default().renew_time = Some(MicroTime(now));
                    o.commit(&PostParams::default()).await.map(|()| true)
                } else if holder.is_none() || expired {
                    let s = o.get_mut().spec.get_or_insert_default();
                    s.holder_identity = Some(me.clone());
                    s.acquire_time = Some(MicroTime(now));
                    s.renew_time = Some(MicroTime(now));
                    s.lease_duration_seconds = Some(self.duration_secs());
                    s.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    o.commit(&PostParams::default()).await.map(|()| true)
                } else {
                    Ok(false)
                }
            }
        };
        let leading = match result {
            Ok(l) => l,
            Err(kube::api::entry::CommitError::Save(e)) if is_conflict(&e) => {
                debug!(lease = %self.cfg.name, "lost a race for the lease");
                false
            }
            Err(kube::api::entry::CommitError::Save(e)) => return Err(self.err(e)),
            Err(kube::api::entry::CommitError::Validate(e)) => {
                return Err(self.err(kube::Error::Service(e.into())));
            }
        };
        if leading != self.leading {
            if leading {
                info!(lease = %self.cfg.name, identity = %me, "leading: this agent writes status");
            } else {
                info!(lease = %self.cfg.name, identity = %me, "not leading: another agent writes status");
            }
        }
        self.leading = leading;
        Ok(leading)
    }

    /// Gives the lease up if this agent holds it, so another takes over at once.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        if !self.leading {
            return Ok(());
        }
        self.leading = false;
        let me = self.cfg.identity.clone();
        let entry = self
            .api
            .entry(&self.cfg.name)
            .await
            .map_err(|e| self.err(e))?;
        if let Entry::Occupied(mut o) = entry
            && o.get()
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref())
                == Some(me.as_str())
        {
            o.get_mut().spec.get_or_insert_default().holder_identity = None;
            match o.commit(&PostParams::default()).await {
                Ok(()) => info!(lease = %self.cfg.name, "lease released"),
                Err(kube::api::entry::CommitError::Save(e)) if is_conflict(&e) => {}
                Err(kube::api::entry::CommitError::Save(e)) => return Err(self.err(e)),
                Err(kube::api::entry::CommitError::Validate(e)) => {
                    return Err(self.err(kube::Error::Service(e.into())));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
