//! Envoy xDS plumbing (in progress).
