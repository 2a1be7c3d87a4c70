//! What serde cannot check: ranges, addresses, AE titles, one section at a time; and the effective
//! configuration rendered with its secrets masked (`dicomchain check-config`).

use super::*;

impl Config {
    /// Checks the values that serde cannot: ranges, addresses, AE titles.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.check_node_identity()?;
        self.check_limits()?;
        self.check_ledger()?;
        self.check_store()?;
        self.check_peers()?;
        self.check_forwarding()?;
        Ok(())
    }

    /// The AE title and the listeners.
    fn check_node_identity(&self) -> Result<(), ConfigError> {
        if !valid_ae_title(&self.node.ae_title) {
            return Err(invalid(
                "node.ae_title",
                "must be 1-16 printable ASCII characters, no backslash",
            ));
        }
        let plain = self.node.listen_addr()?;
        if plain.is_none() && self.node.tls.listen_addr()?.is_none() {
            return Err(invalid(
                "node.listen",
                "is empty (plain listener off) and node.tls.listen is not set: the node would not listen at all",
            ));
        }
        for (key, v) in [
            (
                "node.max_associations_per_ae",
                self.node.max_associations_per_ae,
            ),
            (
                "node.max_associations_per_ip",
                self.node.max_associations_per_ip,
            ),
            (
                "node.max_unknown_associations",
                self.node.max_unknown_associations,
            ),
            (
                "node.max_pending_connections",
                Some(self.node.max_pending_connections),
            ),
            (
                "node.max_pending_per_ip",
                Some(self.node.max_pending_per_ip),
            ),
        ] {
            if v == Some(0) {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        if self.node.tls.listen_addr()?.is_some()
            && (self.node.tls.cert.as_os_str().is_empty()
                || self.node.tls.key.as_os_str().is_empty())
        {
            return Err(invalid(
                "node.tls.cert",
                "node.tls.cert and node.tls.key are required with node.tls.listen",
            ));
        }
        Ok(())
    }

    /// Association, PDU, timeout and memory limits.
    fn check_limits(&self) -> Result<(), ConfigError> {
        if self.node.max_associations == 0 {
            return Err(invalid("node.max_associations", "must be at least 1"));
        }
        // PS3.8 §9.3.1: the receive length is at least one fragment header plus data; dicom-ul
        // refuses anything under 4096 bytes and over 16 MiB in practice.
        if !(4096..=16 * 1024 * 1024).contains(&self.node.max_pdu_length) {
            return Err(invalid(
                "node.max_pdu_length",
                "must be between 4096 and 16777216",
            ));
        }
        if self.node.io_timeout_secs == 0
            || self.node.idle_timeout_secs == 0
            || self.node.artim_timeout_secs == 0
        {
            return Err(invalid(
                "node.io_timeout_secs",
                "timeouts must be at least 1 second",
            ));
        }
        if self.node.max_metadata_bytes < 64 * 1024 {
            return Err(invalid("node.max_metadata_bytes", "must be at least 65536"));
        }
        // Room for one data set of the largest metadata, with all its copies, beside the
        // ledger's part.
        let one = crate::memory::COPIES * self.node.largest_metadata();
        if self.node.ingest_budget() < one || self.node.max_bytes_in_flight > u32::MAX as usize {
            return Err(invalid(
                "node.max_bytes_in_flight",
                format!(
                    "must be at least {} (64 MiB of ledger memtables and five times \
                     node.max_metadata_bytes + node.max_pdu_length) and at most 4294967295",
                    self.node.ledger_memory() + one
                ),
            ));
        }
        // S3 uploads hold up to about three parts in memory besides the metadata.
        if self.store.backend == StoreBackend::S3
            && (self.node.ingest_budget() as u64) < one as u64 + 3 * self.store.s3.part_size
        {
            return Err(invalid(
                "node.max_bytes_in_flight",
                format!(
                    "must be at least {} with the S3 backend (three parts of store.s3.part_size \
                     more)",
                    (self.node.ledger_memory() + one) as u64 + 3 * self.store.s3.part_size
                ),
            ));
        }
        if self.node.max_find_results == 0 {
            return Err(invalid("node.max_find_results", "must be at least 1"));
        }
        Ok(())
    }

    /// The ledger section.
    fn check_ledger(&self) -> Result<(), ConfigError> {
        let origin = &self.ledger.origin;
        if origin.is_empty() || origin.contains(char::is_whitespace) || origin.contains('+') {
            return Err(invalid(
                "ledger.origin",
                "must be non-empty, without spaces or '+'",
            ));
        }
        if self.ledger.checkpoint_interval == 0 {
            return Err(invalid(
                "ledger.checkpoint_interval",
                "must be at least 1 second",
            ));
        }
        Ok(())
    }

    /// The object store section.
    fn check_store(&self) -> Result<(), ConfigError> {
        if self.store.timeout_secs == 0 {
            return Err(invalid("store.timeout_secs", "must be at least 1 second"));
        }
        if self.store.backend == StoreBackend::S3 {
            let s3 = &self.store.s3;
            if !(s3.endpoint.starts_with("http://") || s3.endpoint.starts_with("https://")) {
                return Err(invalid(
                    "store.s3.endpoint",
                    "must start with http:// or https://",
                ));
            }
            if s3.bucket.is_empty() {
                return Err(invalid("store.s3.bucket", "must not be empty"));
            }
            if s3.part_size < 5 * 1024 * 1024 {
                return Err(invalid(
                    "store.s3.part_size",
                    "must be at least 5 MiB (5242880), the S3 minimum",
                ));
            }
            if !s3.access_key.is_empty() && s3.access_key_file.is_some() {
                return Err(invalid(
                    "store.s3.access_key",
                    "give access_key or access_key_file, not both",
                ));
            }
            if !s3.secret_key.is_empty() && s3.secret_key_file.is_some() {
                return Err(invalid(
                    "store.s3.secret_key",
                    "give secret_key or secret_key_file, not both",
                ));
            }
            s3.resolved_access_key()?;
            s3.resolved_secret_key()?;
        }
        Ok(())
    }

    /// The peers.
    fn check_peers(&self) -> Result<(), ConfigError> {
        for (name, peer) in &self.peers {
            if !valid_ae_title(&peer.ae_title) {
                return Err(invalid(
                    &format!("peers.{name}.ae_title"),
                    "must be 1-16 printable ASCII characters",
                ));
            }
            if peer.host.is_empty() {
                return Err(invalid(&format!("peers.{name}.host"), "must not be empty"));
            }
            for a in &peer.allowed_addresses {
                crate::acl::Network::parse(a)
                    .map_err(|e| invalid(&format!("peers.{name}.allowed_addresses"), e))?;
            }
            if (peer.tls_required || !peer.tls_names.is_empty()) && self.node.tls.listen.is_empty()
            {
                return Err(invalid(
                    &format!("peers.{name}.tls_required"),
                    "this peer may associate only over TLS, but node.tls.listen is not set",
                ));
            }
            if !peer.tls_names.is_empty() && self.node.tls.client_ca.as_os_str().is_empty() {
                return Err(invalid(
                    &format!("peers.{name}.tls_names"),
                    "names a client certificate, but node.tls.client_ca is not set (no client certificate is asked for)",
                ));
            }
            if peer.tls_names.iter().any(|n| n.trim().is_empty()) {
                return Err(invalid(
                    &format!("peers.{name}.tls_names"),
                    "a name must not be empty",
                ));
            }
            if name.contains('\0') || name.contains('*') {
                return Err(invalid(
                    &format!("peers.{name}"),
                    "a peer name must not contain NUL or '*'",
                ));
            }
        }
        Ok(())
    }

    /// The forward rules and the forwarding section.
    fn check_forwarding(&self) -> Result<(), ConfigError> {
        for (i, rule) in self.forward.iter().enumerate() {
            if !self.peers.contains_key(&rule.destination) {
                let known: Vec<&str> = self.peers.keys().map(String::as_str).collect();
                return Err(invalid(
                    &format!("forward[{i}].destination"),
                    format!(
                        "{:?} is not a [peers.NAME] name (known: {})",
                        rule.destination,
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                ));
            }
        }
        self.admin.listen_addr()?;
        self.audit.syslog_addr()?;
        let f = &self.forwarding;
        if !(0..=19).contains(&f.niceness) {
            return Err(invalid("forwarding.niceness", "must be between 0 and 19"));
        }
        if f.max_attempts == 0 {
            return Err(invalid("forwarding.max_attempts", "must be at least 1"));
        }
        if f.retry_initial_ms == 0 || f.retry_initial_ms > 3_600_000 {
            return Err(invalid(
                "forwarding.retry_initial_ms",
                "must be between 1 and 3600000 (an hour)",
            ));
        }
        if f.retry_max_secs == 0 || f.retry_max_secs > 86_400 {
            return Err(invalid(
                "forwarding.retry_max_secs",
                "must be between 1 and 86400 (a day)",
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML-like text, with secrets masked, for `check-config`.
    pub fn render_masked(&self) -> String {
        let mask = |s: &str| {
            if s.is_empty() {
                "\"\"".to_string()
            } else {
                "\"********\"".to_string()
            }
        };
        let mut out = String::new();
        let n = &self.node;
        out += &format!(
            "[node]\nae_title = {:?}\nlisten = {:?}\nmax_associations = {}\nmax_pdu_length = {}\ncheck_called_ae = {}\nidle_timeout_secs = {}\nio_timeout_secs = {}\nartim_timeout_secs = {}\ndrain_timeout_secs = {}\nmax_bytes_in_flight = {}\nmax_metadata_bytes = {}\nmax_find_results = {}\nfind_case_insensitive_names = {}\nmax_retrieve_buffer_bytes = {}\nlog_format = {:?}\nallow_unknown_peers = {}\n\n",
            n.ae_title, n.listen, n.max_associations, n.max_pdu_length, n.check_called_ae, n.idle_timeout_secs, n.io_timeout_secs, n.artim_timeout_secs, n.drain_timeout_secs, n.max_bytes_in_flight, n.max_metadata_bytes, n.max_find_results, n.find_case_insensitive_names, n.max_retrieve_buffer_bytes, if n.log_format == LogFormat::Json { "json" } else { "text" }, n.allow_unknown_peers
        );
        let t = &n.tls;
        out += &format!(
            "[node.tls]\nlisten = {:?}\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\n\n",
            t.listen,
            t.cert.display().to_string(),
            t.key.display().to_string(),
            t.client_ca.display().to_string()
        );
        out += &format!(
            "[ledger]\npath = {:?}\nsigning_key_file = {:?}\norigin = {:?}\ncheckpoint_interval = {}\nevent_spool = {:?}\n\n",
            self.ledger.path.display().to_string(),
            self.ledger.signing_key_file.display().to_string(),
            self.ledger.origin,
            self.ledger.checkpoint_interval,
            self.ledger.event_spool.display().to_string()
        );
        let st = &self.store;
        let backend = match st.backend {
            StoreBackend::Fs => "fs",
            StoreBackend::S3 => "s3",
        };
        out += &format!(
            "[store]\nbackend = {backend:?}\ntimeout_secs = {}\n\n",
            st.timeout_secs
        );
        out += &format!(
            "[store.fs]\nroot = {:?}\n\n",
            st.fs.root.display().to_string()
        );
        let s3 = &st.s3;
        out += &format!(
            "[store.s3]\nendpoint = {:?}\nbucket = {:?}\nregion = {:?}\naccess_key = {}\nsecret_key = {}\npart_size = {}\nretries = {}\n",
            s3.endpoint, s3.bucket, s3.region, mask(&s3.access_key), mask(&s3.secret_key), s3.part_size, s3.retries
        );
        if let Some(p) = &s3.access_key_file {
            out += &format!("access_key_file = {:?}\n", p.display().to_string());
        }
        if let Some(p) = &s3.secret_key_file {
            out += &format!("secret_key_file = {:?}\n", p.display().to_string());
        }
        for (name, p) in &self.peers {
            out += &format!(
                "\n[peers.{name}]\nae_title = {:?}\nhost = {:?}\nport = {}\npermissions = {:?}\nallowed_addresses = {:?}\n",
                p.ae_title,
                p.host,
                p.port,
                p.permissions
                    .as_deref()
                    .unwrap_or(&crate::acl::Permission::ALL)
                    .iter()
                    .map(|p| p.name())
                    .collect::<Vec<_>>(),
                p.allowed_addresses
            );
        }
        let f = &self.forwarding;
        out += &format!(
            "\n[forwarding]\nmax_attempts = {}\nretry_initial_ms = {}\nretry_max_secs = {}\nidle_release_secs = {}\nniceness = {}\nyield_to_ingest_secs = {}\n",
            f.max_attempts, f.retry_initial_ms, f.retry_max_secs, f.idle_release_secs, f.niceness, f.yield_to_ingest_secs
        );
        out += &format!("\n[audit]\nsyslog = {:?}\n", self.audit.syslog);
        out += &format!(
            "\n[security]\nmaster_key_file = {:?}\n",
            self.security.master_key_file.display().to_string()
        );
        out += &format!(
            "\n[admin]\nlisten = {:?}\ntoken_file = {:?}\n",
            self.admin.listen,
            self.admin.token_file.display().to_string()
        );
        for r in &self.forward {
            out += &format!(
                "\n[[forward]]\ndestination = {:?}\ncalling_ae = {:?}\ncalled_ae = {:?}\nmodality = {:?}\nsop_class = {:?}\n",
                r.destination, r.calling_ae, r.called_ae, r.modality, r.sop_class
            );
        }
        out
    }
}
