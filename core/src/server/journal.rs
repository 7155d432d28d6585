//! The journal: one SQLite database in the state folder recording what the server served, what
//! clients rewarded, how rewards formed groups, and which step consumed each group.
//!
//! It is what makes rewards durable (a reward is committed, `synchronous = FULL` in WAL mode,
//! before its reply), what a restarted server rebuilds its training queues from, and the
//! rollout log (`GET /v1/rollouts`, `hicra analyze STATE_DIR`).
//!
//! Tables:
//! - `rollouts`: every served completion (written in the background, in batches), with its
//!   reward once given (written synchronously), its group and the advantages it trained with;
//! - `groups`: one row per reward group, with its `state`: `pending` (collecting rewards),
//!   `ready` (complete, waiting for a step), or what happened to it: `trained`,
//!   `zero_variance`, `rejected`, `stale`, `plugin_dropped`, `failed`, `expired`;
//! - `steps`: every step that ran, its report, the policy version it produced, and `lost`.
//!
//! Exactly-once training across crashes: a `trained` group records the policy version its step
//! produced. A restart resumes from a checkpoint of version `v`; the updates of steps after `v`
//! were never saved, so [`Journal::recover`] marks those steps `lost` and puts their groups back
//! to `ready`: they train once more, on the restored weights. Groups trained at or before `v`
//! are in the checkpoint's weights and stay `trained` forever.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension, Transaction};
use serde_json::{json, Value};

use super::rollouts::Rollout;
use crate::analysis::RolloutRecord;

/// Served rollouts written per background transaction, at most.
const BATCH: usize = 256;
/// The background writer prunes after this many inserts.
const PRUNE_EVERY: usize = 1024;

/// Why the journal failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// SQLite refused an operation.
    #[error("journal {}: {source}", path.display())]
    Sqlite {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        #[source]
        source: rusqlite::Error,
    },
    /// A stored row does not parse (written by another version, or damaged).
    #[error("journal {}: {what}", path.display())]
    Corrupt {
        /// The database file.
        path: PathBuf,
        /// Which row and why.
        what: String,
    },
}

/// What happened to a group a step took.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupOutcome {
    /// Its tokens carried gradient.
    Trained,
    /// All rewards were equal: no signal.
    ZeroVariance,
    /// The trainer refused it on its own.
    Rejected,
    /// Too few members were within `max_staleness`.
    Stale,
    /// A detector or credit plugin dropped it.
    PluginDropped,
    /// The whole step failed.
    Failed,
}

impl GroupOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Trained => "trained",
            Self::ZeroVariance => "zero_variance",
            Self::Rejected => "rejected",
            Self::Stale => "stale",
            Self::PluginDropped => "plugin_dropped",
            Self::Failed => "failed",
        }
    }
}

/// A group opened by a batch of rewards.
#[derive(Clone, Debug)]
pub struct NewGroup {
    /// `request/ID` or `named/ID`.
    pub key: String,
    /// The id clients see.
    pub id: String,
    /// Members it completes at.
    pub expected: usize,
    /// Named by the client (else a request's choices).
    pub named: bool,
    /// Unix seconds of its first reward.
    pub opened_at: f64,
}

/// A group a reward joins: already journaled, or the `i`-th of this batch's new groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupRef {
    /// Its row id.
    Journaled(i64),
    /// Index into the batch's new groups.
    New(usize),
}

/// One reward of a batch: the rollout with its reward set.
pub struct RewardRow<'a> {
    /// The rollout, `reward` set.
    pub rollout: &'a Rollout,
    /// Its group.
    pub group: GroupRef,
}

/// A group as the journal holds it, with its rewarded members.
#[derive(Clone, Debug)]
pub struct JournalGroup {
    /// Row id.
    pub seq: i64,
    /// `request/ID` or `named/ID`.
    pub key: String,
    /// The id clients see.
    pub id: String,
    /// Members it completes at.
    pub expected: usize,
    /// Unix seconds of its first reward.
    pub opened_at: f64,
    /// Rewarded members, in reward order.
    pub members: Vec<Rollout>,
}

/// What a restart found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Groups still collecting rewards.
    pub pending: Vec<JournalGroup>,
    /// Complete groups waiting for a step, oldest first (including `retrained`).
    pub ready: Vec<JournalGroup>,
    /// Groups whose training was lost with the weights (steps after the checkpoint).
    pub retrained_groups: usize,
    /// Steps after the checkpoint, now marked lost.
    pub lost_steps: usize,
    /// Groups per state, and `rewards`, `steps`, `failed_steps`, over the whole journal.
    pub counts: HashMap<String, u64>,
}

/// A step's record: the report and each group's outcome.
pub struct StepRecord<'a> {
    /// Policy version before the step.
    pub version_before: u64,
    /// Policy version after it (equal when nothing updated).
    pub policy_version: u64,
    /// Whether the weights changed.
    pub updated: bool,
    /// The step's report as `GET /v1/training` shows it; `None` when no step ran (every
    /// group was stale) or the step failed: then only the groups' outcomes are recorded.
    pub report: Option<&'a Value>,
    /// Each group's row id and outcome.
    pub outcomes: &'a [(i64, GroupOutcome)],
    /// Per trained rollout, its advantages.
    pub advantages: &'a [(String, Vec<f32>)],
}

/// The database, shared by handlers, the step worker and the background writer.
pub struct Journal {
    path: PathBuf,
    conn: Mutex<Connection>,
    served: Mutex<Option<mpsc::Sender<Rollout>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    retention: usize,
    /// Policy version of the newest checkpoint: groups trained after it must survive pruning,
    /// since a crash now would train them again.
    checkpoint_version: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("path", &self.path).finish()
    }
}

/// Bumped, with a migration, whenever the tables change.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS rollouts (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    created INTEGER NOT NULL,
    policy_version INTEGER NOT NULL,
    body TEXT NOT NULL,
    token_texts TEXT NOT NULL,
    reward REAL,
    rewarded_at REAL,
    group_seq INTEGER,
    advantages TEXT
);
CREATE INDEX IF NOT EXISTS rollouts_group ON rollouts(group_seq);
CREATE TABLE IF NOT EXISTS groups (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    id TEXT NOT NULL,
    expected INTEGER NOT NULL,
    named INTEGER NOT NULL,
    opened_at REAL NOT NULL,
    state TEXT NOT NULL,
    completed_at REAL,
    step_seq INTEGER,
    trained_version INTEGER
);
CREATE INDEX IF NOT EXISTS groups_state ON groups(state);
CREATE TABLE IF NOT EXISTS steps (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    version_before INTEGER NOT NULL,
    policy_version INTEGER NOT NULL,
    updated INTEGER NOT NULL,
    lost INTEGER NOT NULL DEFAULT 0,
    report TEXT NOT NULL
);
";

/// Unix seconds, fractional.
pub(crate) fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// The stored form of a rollout: the API's JSON, plus the token texts the API leaves out.
/// Non-finite floats (which JSON cannot hold and would not read back) are stored as 0.
fn encode(rollout: &Rollout) -> (String, String) {
    let all_finite = [&rollout.logprobs, &rollout.sampling_logprobs, &rollout.entropies].iter().all(|v| v.iter().all(|x| x.is_finite()));
    // The usual case serializes the rollout as it is; only a non-finite value costs a copy.
    let cleaned;
    let body_of = if all_finite {
        rollout
    } else {
        let finite = |values: &[f32]| values.iter().map(|v| if v.is_finite() { *v } else { 0.0 }).collect::<Vec<f32>>();
        cleaned = Rollout { logprobs: finite(&rollout.logprobs), sampling_logprobs: finite(&rollout.sampling_logprobs), entropies: finite(&rollout.entropies), ..rollout.clone() };
        &cleaned
    };
    let body = serde_json::to_string(body_of).unwrap_or_else(|e| format!("{{\"unencodable\": {:?}}}", e.to_string()));
    (body, serde_json::to_string(&rollout.token_texts).unwrap_or_else(|_| "[]".into()))
}

impl Journal {
    /// Opens (creating) the journal at `path`, keeping about `retention` rollouts (rollouts of
    /// groups still collecting or waiting are never pruned), and starts its background writer.
    pub fn open(path: &Path, retention: usize) -> Result<Arc<Self>, JournalError> {
        let err = |source| JournalError::Sqlite { path: path.to_path_buf(), source };
        let conn = Connection::open(path).map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
        // FULL: a commit is on disk (WAL fsynced) before the call returns, so a reward
        // acknowledged to a client survives power loss, not only a process crash.
        conn.pragma_update(None, "synchronous", "FULL").map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10)).map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        let version: i64 = conn.pragma_query_value(None, "user_version", |row| row.get(0)).map_err(err)?;
        match version {
            0 => conn.pragma_update(None, "user_version", SCHEMA_VERSION).map_err(err)?,
            SCHEMA_VERSION => {}
            newer => return Err(JournalError::Corrupt { path: path.to_path_buf(), what: format!("schema version {newer} was written by a newer hicra (this one reads {SCHEMA_VERSION})") }),
        }
        let journal = Arc::new(Self { path: path.to_path_buf(), conn: Mutex::new(conn), served: Mutex::new(None), writer: Mutex::new(None), retention: retention.max(1), checkpoint_version: std::sync::atomic::AtomicU64::new(0) });
        let (sender, receiver) = mpsc::channel();
        *journal.served.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
        let writer = journal.clone();
        let thread = std::thread::Builder::new()
            .name("hicra-journal".into())
            .spawn(move || writer.write_served(receiver))
            .map_err(|e| JournalError::Corrupt { path: path.to_path_buf(), what: format!("cannot start the writer thread: {e}") })?;
        *journal.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some(thread);
        Ok(journal)
    }

    /// Writes the served rollouts still queued and stops the background writer (at shutdown;
    /// later served rollouts are not journaled).
    pub fn close(&self) {
        drop(self.served.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(thread) = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tells pruning which policy version the newest checkpoint holds.
    pub fn set_checkpoint_version(&self, version: u64) {
        self.checkpoint_version.fetch_max(version, std::sync::atomic::Ordering::AcqRel);
    }

    fn sqlite(&self) -> impl Fn(rusqlite::Error) -> JournalError + '_ {
        |source| JournalError::Sqlite { path: self.path.clone(), source }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic mid-transaction rolls the transaction back when it is dropped.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a served rollout for the background writer (a crash may lose the last few
    /// unrewarded ones; a reward always writes its rollout synchronously).
    pub fn served(&self, rollout: &Rollout) {
        if let Some(sender) = self.served.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            let _ = sender.send(rollout.clone());
        }
    }

    /// Background writer: batches served rollouts into transactions and prunes.
    fn write_served(&self, receiver: mpsc::Receiver<Rollout>) {
        let mut since_prune = 0;
        while let Ok(first) = receiver.recv() {
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match receiver.try_recv() {
                    Ok(more) => batch.push(more),
                    Err(_) => break,
                }
            }
            since_prune += batch.len();
            if let Err(err) = self.insert_served(&batch) {
                tracing::warn!(%err, rollouts = batch.len(), "served rollouts not journaled");
            }
            if since_prune >= PRUNE_EVERY {
                since_prune = 0;
                match self.prune() {
                    Ok(0) => {}
                    Ok(removed) => tracing::info!(removed, retention = self.retention, "old rollouts pruned from the journal"),
                    Err(err) => tracing::warn!(%err, "journal pruning failed"),
                }
            }
        }
    }

    fn insert_served(&self, batch: &[Rollout]) -> Result<(), JournalError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.sqlite())?;
        for rollout in batch {
            insert_rollout(&tx, rollout).map_err(self.sqlite())?;
        }
        tx.commit().map_err(self.sqlite())
    }

    /// Deletes the oldest rollouts beyond the retention, except members of groups that are
    /// still pending or ready or were trained after the newest checkpoint (a restart trains
    /// those again), and groups left without rollouts. Returns rollouts removed.
    pub fn prune(&self) -> Result<usize, JournalError> {
        let conn = self.lock();
        let checkpoint = self.checkpoint_version.load(std::sync::atomic::Ordering::Acquire) as i64;
        let removed = conn
            .execute(
                "DELETE FROM rollouts WHERE seq <= (SELECT MAX(seq) FROM rollouts) - ?1
                 AND (group_seq IS NULL OR group_seq NOT IN (SELECT seq FROM groups
                      WHERE state IN ('pending', 'ready') OR (state = 'trained' AND trained_version > ?2)))",
                params![self.retention as i64, checkpoint],
            )
            .map_err(self.sqlite())?;
        if removed > 0 {
            conn.execute("DELETE FROM groups WHERE state NOT IN ('pending', 'ready') AND seq NOT IN (SELECT group_seq FROM rollouts WHERE group_seq IS NOT NULL)", [])
                .map_err(self.sqlite())?;
        }
        Ok(removed)
    }

    /// Rollout `id` as journaled (with its reward and group id once rewarded).
    pub fn rollout(&self, id: &str) -> Result<Option<Rollout>, JournalError> {
        let conn = self.lock();
        let row = conn
            .query_row(
                "SELECT r.body, r.token_texts, r.reward, g.id FROM rollouts r LEFT JOIN groups g ON g.seq = r.group_seq WHERE r.id = ?1",
                params![id],
                |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, Option<f64>>(2)?, row.get::<_, Option<String>>(3)?)),
            )
            .optional()
            .map_err(self.sqlite())?;
        let Some((body, texts, reward, group)) = row else { return Ok(None) };
        let mut rollout = self.decode(&body, &texts)?;
        rollout.reward = reward.map(|r| r as f32);
        if let Some(group) = group {
            rollout.group = group;
        }
        Ok(Some(rollout))
    }

    fn decode(&self, body: &str, texts: &str) -> Result<Rollout, JournalError> {
        decode(&self.path, body, texts)
    }

    /// Records a batch of rewards in one synchronous transaction: opens `new_groups`, writes
    /// each rewarded rollout, and marks `completed` groups ready. Returns the new groups' row
    /// ids. Nothing is recorded when it fails.
    pub fn record_rewards(&self, new_groups: &[NewGroup], rewards: &[RewardRow<'_>], completed: &[GroupRef]) -> Result<Vec<i64>, JournalError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.sqlite())?;
        let mut opened = Vec::with_capacity(new_groups.len());
        for group in new_groups {
            tx.execute(
                "INSERT INTO groups (key, id, expected, named, opened_at, state) VALUES (?1, ?2, ?3, ?4, ?5, 'pending')",
                params![group.key, group.id, group.expected as i64, group.named, group.opened_at],
            )
            .map_err(self.sqlite())?;
            opened.push(tx.last_insert_rowid());
        }
        let seq = |group: &GroupRef| match *group {
            GroupRef::Journaled(seq) => Ok(seq),
            GroupRef::New(i) => opened.get(i).copied().ok_or_else(|| JournalError::Corrupt { path: self.path.clone(), what: format!("reward refers to new group {i} of {}", opened.len()) }),
        };
        let at = now();
        for reward in rewards {
            insert_rollout(&tx, reward.rollout).map_err(self.sqlite())?;
            tx.execute(
                "UPDATE rollouts SET reward = ?1, rewarded_at = ?2, group_seq = ?3 WHERE id = ?4",
                params![reward.rollout.reward.map(f64::from), at, seq(&reward.group)?, reward.rollout.id],
            )
            .map_err(self.sqlite())?;
        }
        for group in completed {
            tx.execute("UPDATE groups SET state = 'ready', completed_at = ?1 WHERE seq = ?2", params![at, seq(group)?]).map_err(self.sqlite())?;
        }
        tx.commit().map_err(self.sqlite())?;
        Ok(opened)
    }

    /// Marks incomplete groups expired.
    pub fn expire(&self, groups: &[i64]) -> Result<(), JournalError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.sqlite())?;
        for seq in groups {
            tx.execute("UPDATE groups SET state = 'expired' WHERE seq = ?1 AND state = 'pending'", params![seq]).map_err(self.sqlite())?;
        }
        tx.commit().map_err(self.sqlite())
    }

    /// Records a step and what it did with each group, in one transaction.
    pub fn record_step(&self, step: &StepRecord<'_>) -> Result<(), JournalError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.sqlite())?;
        let step_seq = match step.report {
            Some(report) => {
                tx.execute(
                    "INSERT INTO steps (at, version_before, policy_version, updated, report) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![now(), step.version_before as i64, step.policy_version as i64, step.updated, report.to_string()],
                )
                .map_err(self.sqlite())?;
                Some(tx.last_insert_rowid())
            }
            None => None,
        };
        for (group, outcome) in step.outcomes {
            let trained_version = (*outcome == GroupOutcome::Trained).then_some(step.policy_version as i64);
            tx.execute(
                "UPDATE groups SET state = ?1, step_seq = ?2, trained_version = ?3 WHERE seq = ?4",
                params![outcome.as_str(), step_seq, trained_version, group],
            )
            .map_err(self.sqlite())?;
        }
        for (id, advantages) in step.advantages {
            tx.execute("UPDATE rollouts SET advantages = ?1 WHERE id = ?2", params![serde_json::to_string(advantages).unwrap_or_default(), id])
                .map_err(self.sqlite())?;
        }
        tx.commit().map_err(self.sqlite())
    }

    /// Reconciles the journal with the checkpoint the server restarted from (policy version
    /// `checkpoint_version`; 0 without one) and returns the groups to serve again.
    pub fn recover(&self, checkpoint_version: u64) -> Result<Recovery, JournalError> {
        let mut conn = self.lock();
        let tx = conn.transaction().map_err(self.sqlite())?;
        let version = checkpoint_version as i64;
        let lost_steps = tx.execute("UPDATE steps SET lost = 1 WHERE lost = 0 AND updated = 1 AND policy_version > ?1", params![version]).map_err(self.sqlite())?;
        let retrained_groups = tx
            .execute("UPDATE groups SET state = 'ready', step_seq = NULL, trained_version = NULL WHERE state = 'trained' AND trained_version > ?1", params![version])
            .map_err(self.sqlite())?;
        let pending = self.groups_in(&tx, "pending")?;
        let ready = self.groups_in(&tx, "ready")?;
        let counts = self.counts(&tx)?;
        tx.commit().map_err(self.sqlite())?;
        Ok(Recovery { pending, ready, retrained_groups, lost_steps, counts })
    }

    fn groups_in(&self, tx: &Transaction<'_>, state: &str) -> Result<Vec<JournalGroup>, JournalError> {
        let mut groups = Vec::new();
        {
            let mut query = tx
                .prepare("SELECT seq, key, id, expected, opened_at FROM groups WHERE state = ?1 ORDER BY completed_at, seq")
                .map_err(self.sqlite())?;
            let rows = query
                .query_map(params![state], |row| {
                    Ok(JournalGroup { seq: row.get(0)?, key: row.get(1)?, id: row.get(2)?, expected: row.get::<_, i64>(3)? as usize, opened_at: row.get(4)?, members: Vec::new() })
                })
                .map_err(self.sqlite())?;
            for row in rows {
                groups.push(row.map_err(self.sqlite())?);
            }
        }
        let mut members = tx.prepare("SELECT body, token_texts, reward FROM rollouts WHERE group_seq = ?1 ORDER BY rewarded_at, seq").map_err(self.sqlite())?;
        for group in &mut groups {
            let rows = members
                .query_map(params![group.seq], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, Option<f64>>(2)?)))
                .map_err(self.sqlite())?;
            for row in rows {
                let (body, texts, reward) = row.map_err(self.sqlite())?;
                // One unreadable row costs its group a member, not the whole restart.
                let mut rollout = match self.decode(&body, &texts) {
                    Ok(rollout) => rollout,
                    Err(err) => {
                        tracing::error!(group = %group.id, %err, "a journaled rollout does not parse; its group goes on without it");
                        continue;
                    }
                };
                rollout.reward = reward.map(|r| r as f32);
                rollout.group = group.id.clone();
                group.members.push(rollout);
            }
        }
        Ok(groups)
    }

    fn counts(&self, tx: &Transaction<'_>) -> Result<HashMap<String, u64>, JournalError> {
        let mut counts = HashMap::new();
        let mut query = tx.prepare("SELECT state, COUNT(*) FROM groups GROUP BY state").map_err(self.sqlite())?;
        let rows = query.query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))).map_err(self.sqlite())?;
        for row in rows {
            let (state, count) = row.map_err(self.sqlite())?;
            counts.insert(state, count as u64);
        }
        let count = |sql: &str| tx.query_row(sql, [], |row| row.get::<_, i64>(0)).map(|n| n as u64).map_err(self.sqlite());
        counts.insert("rewards".into(), count("SELECT COUNT(*) FROM rollouts WHERE reward IS NOT NULL")?);
        counts.insert("steps".into(), count("SELECT COUNT(*) FROM steps WHERE lost = 0")?);
        Ok(counts)
    }

    /// Up to `limit` journaled rollouts after row `after`, oldest first, each with its
    /// reward, group and the advantages it trained with; and the row id to continue after.
    pub fn page(&self, after: i64, limit: usize, rewarded_only: bool) -> Result<(Vec<Value>, Option<i64>), JournalError> {
        let conn = self.lock();
        let mut query = conn
            .prepare(
                "SELECT r.seq, r.body, r.reward, r.advantages, g.id, g.state, g.trained_version
                 FROM rollouts r LEFT JOIN groups g ON g.seq = r.group_seq
                 WHERE r.seq > ?1 AND (?2 = 0 OR r.reward IS NOT NULL) ORDER BY r.seq LIMIT ?3",
            )
            .map_err(self.sqlite())?;
        let rows = query
            .query_map(params![after, rewarded_only, limit as i64], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<f64>>(2)?,
                    row.get::<_, Option<String>>(3)?,
                    row.get::<_, Option<String>>(4)?,
                    row.get::<_, Option<String>>(5)?,
                    row.get::<_, Option<i64>>(6)?,
                ))
            })
            .map_err(self.sqlite())?;
        let mut page = Vec::new();
        let mut last = None;
        for row in rows {
            let (seq, body, reward, advantages, group_id, group_state, trained_version) = row.map_err(self.sqlite())?;
            let mut item: Value = serde_json::from_str(&body).map_err(|e| JournalError::Corrupt { path: self.path.clone(), what: format!("rollout row {seq}: {e}") })?;
            item["seq"] = json!(seq);
            item["reward"] = json!(reward);
            if let Some(group) = group_id {
                item["group"] = json!(group);
            }
            item["group_state"] = json!(group_state);
            item["trained_policy_version"] = json!(trained_version);
            item["advantages"] = advantages.and_then(|a| serde_json::from_str(&a).ok()).unwrap_or(Value::Null);
            page.push(item);
            last = Some(seq);
        }
        Ok((page, last))
    }
}

/// A rollout row back as the rollout, with its token texts.
fn decode(path: &Path, body: &str, texts: &str) -> Result<Rollout, JournalError> {
    let corrupt = |e: serde_json::Error| JournalError::Corrupt { path: path.to_path_buf(), what: format!("a rollout row does not parse: {e}") };
    let mut rollout: Rollout = serde_json::from_str(body).map_err(corrupt)?;
    rollout.token_texts = serde_json::from_str(texts).map_err(corrupt)?;
    Ok(rollout)
}

fn insert_rollout(tx: &Transaction<'_>, rollout: &Rollout) -> rusqlite::Result<usize> {
    let (body, texts) = encode(rollout);
    tx.execute(
        "INSERT OR IGNORE INTO rollouts (id, created, policy_version, body, token_texts) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![rollout.id, rollout.created as i64, rollout.policy_version as i64, body, texts],
    )
}

/// The rollouts of every group a step trained (steps whose update was lost excluded), as
/// `hicra analyze` reads them: `step` is the policy version of each rollout's last token.
pub fn trained_records(path: &Path) -> Result<Vec<RolloutRecord>, JournalError> {
    let err = |source| JournalError::Sqlite { path: path.to_path_buf(), source };
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(err)?;
    let mut query = conn
        .prepare(
            "SELECT r.body, r.token_texts, r.reward, r.advantages, g.id FROM rollouts r JOIN groups g ON g.seq = r.group_seq
             WHERE g.state IN ('trained', 'zero_variance') ORDER BY g.step_seq, g.seq, r.seq",
        )
        .map_err(err)?;
    let rows = query
        .query_map([], |row| Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?, row.get::<_, Option<f64>>(2)?, row.get::<_, Option<String>>(3)?, row.get::<_, String>(4)?)))
        .map_err(err)?;
    let mut records = Vec::new();
    for row in rows {
        let (body, texts, reward, advantages, group) = row.map_err(err)?;
        let rollout = Rollout { reward: Some(reward.unwrap_or(0.0) as f32), ..decode(path, &body, &texts)? };
        records.push(rollout.analysis_record(&group, advantages.and_then(|a| serde_json::from_str(&a).ok()).unwrap_or_default()));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::SamplingParams;

    fn rollout(id: &str) -> Rollout {
        Rollout {
            id: id.into(),
            model: "m".into(),
            policy_version: 0,
            policy_version_first: 0,
            prompt_token_ids: vec![1, 2],
            completion_token_ids: vec![3],
            logprobs: vec![-0.5],
            sampling_logprobs: vec![-0.4],
            entropies: vec![1.0],
            token_texts: vec![" x".into()],
            finish_reason: "stop".into(),
            text: " x".into(),
            sampling: SamplingParams::default(),
            created: 0,
            user: None,
            group: "req".into(),
            group_size: 2,
            reward: None,
            sampled_mask: Vec::new(),
        }
    }

    #[test]
    fn retention_prunes_the_oldest_rollouts_but_never_a_waiting_groups() -> Result<(), JournalError> {
        let path = std::env::temp_dir().join(format!("hicra-journal-retention-{}.sqlite", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let journal = Journal::open(&path, 5)?;
        // The oldest rollout is rewarded into a group that is still collecting.
        let mut first = rollout("ro-0");
        first.reward = Some(1.0);
        let group = NewGroup { key: "named/g".into(), id: "g".into(), expected: 2, named: true, opened_at: 0.0 };
        journal.record_rewards(&[group], &[RewardRow { rollout: &first, group: GroupRef::New(0) }], &[])?;
        for i in 1..12 {
            journal.served(&rollout(&format!("ro-{i}")));
        }
        journal.close();
        assert_eq!(journal.prune()?, 6, "12 rollouts, 5 kept by retention, 1 kept by its pending group");
        let (page, _) = journal.page(0, 100, false)?;
        let ids: Vec<&str> = page.iter().filter_map(|r| r["id"].as_str()).collect();
        assert_eq!(ids, ["ro-0", "ro-7", "ro-8", "ro-9", "ro-10", "ro-11"]);
        assert_eq!(journal.rollout("ro-0")?.and_then(|r| r.reward), Some(1.0));
        assert_eq!(journal.rollout("ro-0")?.map(|r| r.token_texts), Some(vec![" x".to_string()]));
        assert!(journal.rollout("ro-3")?.is_none());
        let recovery = journal.recover(0)?;
        assert_eq!(recovery.pending.len(), 1);
        assert_eq!(recovery.pending[0].members.len(), 1);
        std::fs::remove_file(&path).map_err(|e| JournalError::Corrupt { path: path.clone(), what: e.to_string() })
    }
}
