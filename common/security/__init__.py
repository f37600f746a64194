"""Certificates for TLS and node authentication, and Ed25519 signing of students."""
