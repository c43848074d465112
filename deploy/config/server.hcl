# An example production server configuration. Every process of a cluster uses the same file
# (apart from api_addr); they share the Postgres database and the Redis prefix.

storage "postgresql" {
  connection_url = "postgres://coffer@db.internal:5432/coffer?sslmode=require"
  max_parallel   = 20
}

listener "tcp" {
  address       = "0.0.0.0:8200"
  tls_cert_file = "/etc/coffer/tls/server.crt"
  tls_key_file  = "/etc/coffer/tls/server.key"
}

api_addr     = "https://coffer-1.dc1.internal:8200"
cluster_addr = "https://coffer-1.dc1.internal:8201"
cluster_name = "dc1"

# Unattended unseal: the root key is stored wrapped under this key. Keep the key file outside
# the database host. Without a seal block, each process starts sealed and is unsealed with
# Shamir shares through sys/unseal, as Vault does.
seal "static" {
  current_key_id = "2026-11"
  current_key    = "file:///etc/coffer/seal.key"
}

queue "redis" {
  url    = "redis://redis.internal:6379"
  prefix = "coffer-dc1"
}

replication {
  best_effort_wal_wait_duration = "2s"
  logshipper_buffer_length      = 16384
  logshipper_buffer_size        = "64MiB"
}

log_level = "info"
