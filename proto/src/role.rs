//! A role of the trust root: a set of keys and how many of them must sign. Apart from
//! [`crate::root`] so that envelopes (which check signatures against a role) need not
//! know roots.

use crate::error::RoleError;
use crate::keys::{KeyId, PublicKey};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// Most keys in one role.
pub const MAX_ROLE_KEYS: usize = 16;

/// A set of keys and how many of them must sign.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub keys: Vec<PublicKey>,
    pub threshold: u32,
}

impl Role {
    pub fn key(&self, id: &KeyId) -> Option<&PublicKey> {
        self.keys.iter().find(|k| k.id() == *id)
    }

    pub(crate) fn validate(&self, role: &'static str) -> Result<(), RoleError> {
        let keys = self.keys.len();
        if keys == 0 || keys > MAX_ROLE_KEYS {
            return Err(RoleError::KeyCount {
                role,
                keys,
                max: MAX_ROLE_KEYS,
            });
        }
        if self.threshold == 0 || self.threshold as usize > keys {
            return Err(RoleError::Threshold {
                role,
                threshold: self.threshold,
                keys,
            });
        }
        let distinct: BTreeSet<_> = self.keys.iter().collect();
        if distinct.len() != keys {
            return Err(RoleError::DuplicateKey { role });
        }
        Ok(())
    }
}
