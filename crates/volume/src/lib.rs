//! Volumes of Vessel (see the crate description).
