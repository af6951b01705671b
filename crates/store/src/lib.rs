//! The embedded state store of the Vessel daemon.
//!
//! Owns one transactional database file under the daemon's data root and
//! offers typed, JSON-encoded records in named tables. Every `put` and
//! `delete` is committed durably before it returns, so callers can follow the
//! rule "write the state, then act on it": after a crash the store holds
//! every change that returned `Ok`.
//!
//! It must not know what a container or an image is: it stores records, and
//! the engine gives them meaning.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Serialize};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be opened or a transaction failed.
    #[error("state store: {0}")]
    Db(String),
    /// A record could not be encoded or decoded.
    #[error("state store record {table}/{key}: {source}")]
    Codec {
        /// Table name.
        table: String,
        /// Record key.
        key: String,
        /// Cause.
        source: serde_json::Error,
    },
}

fn db_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// A handle to the database. Cheap to share behind an `Arc`.
pub struct Store {
    db: Database,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Database::create(path)
            .map_err(|e| StoreError::Db(format!("open {}: {e}", path.display())))?;
        Ok(Self { db })
    }

    /// Writes `value` under `key` in `table`, durably.
    pub fn put<T: Serialize>(&self, table: &str, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Codec {
            table: table.into(),
            key: key.into(),
            source,
        })?;
        let def: TableDefinition<&str, &[u8]> = TableDefinition::new(table);
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(def).map_err(db_err)?;
            t.insert(key, bytes.as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Reads the record under `key`, if any.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let def: TableDefinition<&str, &[u8]> = TableDefinition::new(table);
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = match tx.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(db_err(e)),
        };
        let Some(v) = t.get(key).map_err(db_err)? else {
            return Ok(None);
        };
        let value = serde_json::from_slice(v.value()).map_err(|source| StoreError::Codec {
            table: table.into(),
            key: key.into(),
            source,
        })?;
        Ok(Some(value))
    }

    /// Removes the record under `key`; removing a missing record is not an error.
    pub fn delete(&self, table: &str, key: &str) -> Result<(), StoreError> {
        let def: TableDefinition<&str, &[u8]> = TableDefinition::new(table);
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(def).map_err(db_err)?;
            t.remove(key).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    /// Every record of `table`, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: &str) -> Result<Vec<(String, T)>, StoreError> {
        let def: TableDefinition<&str, &[u8]> = TableDefinition::new(table);
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = match tx.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![]),
            Err(e) => return Err(db_err(e)),
        };
        let mut out = vec![];
        for item in t.iter().map_err(db_err)? {
            let (k, v) = item.map_err(db_err)?;
            let key = k.value().to_string();
            let value = serde_json::from_slice(v.value()).map_err(|source| StoreError::Codec {
                table: table.into(),
                key: key.clone(),
                source,
            })?;
            out.push((key, value));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state.db");
        {
            let s = Store::open(&path).expect("open");
            s.put("containers", "a", &vec![1, 2, 3]).expect("put");
            s.put("containers", "b", &vec![4]).expect("put");
            s.delete("containers", "b").expect("delete");
        }
        let s = Store::open(&path).expect("reopen");
        assert_eq!(
            s.get::<Vec<i32>>("containers", "a").expect("get"),
            Some(vec![1, 2, 3])
        );
        assert_eq!(s.get::<Vec<i32>>("containers", "b").expect("get"), None);
        let all: Vec<(String, Vec<i32>)> = s.list("containers").expect("list");
        assert_eq!(all, vec![("a".to_string(), vec![1, 2, 3])]);
        assert!(s.list::<i32>("never-written").expect("list").is_empty());
        assert_eq!(s.get::<i32>("never-written", "x").expect("get"), None);
    }

    #[test]
    fn a_record_of_the_wrong_shape_is_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(&dir.path().join("state.db")).expect("open");
        s.put("t", "k", &"text").expect("put");
        assert!(matches!(
            s.get::<u32>("t", "k"),
            Err(StoreError::Codec { .. })
        ));
    }
}
