//! The commands that act through the running node's admin API: `grant`, `revoke`,
//! `permissions`, `erase` and `forward`, each printing what the node answered.

use std::process::ExitCode;

use super::args::ForwardAction;
use super::serve::runtime;
use crate::config::Config;

pub(crate) fn run_acl_change(cfg: Config, grant: bool, ae: &str, names: &[String]) -> ExitCode {
    use crate::acl::Permission;
    let mut permissions = Vec::new();
    for n in names.iter().flat_map(|n| n.split(',')) {
        match Permission::from_name(n) {
            Some(p) => permissions.push(p),
            None => {
                eprintln!("dicomchain: unknown permission {n:?} (echo, store, find, move, get)");
                return ExitCode::from(2);
            }
        }
    }
    let body = serde_json::json!({ "ae": ae, "permissions": permissions }).to_string();
    let path = if grant { "/v1/grant" } else { "/v1/revoke" };
    let result = admin_call(&cfg, hyper::Method::POST, path, Some(body));
    match result {
        Ok(v) => {
            println!(
                "{} {} {ae}: ledger entry {}",
                if grant { "granted" } else { "revoked" },
                Permission::list(&permissions),
                v["seq"]
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dicomchain: {e}");
            ExitCode::from(2)
        }
    }
}

/// One request to the running node's admin API, from a runtime of its own.
fn admin_call(
    cfg: &Config,
    method: hyper::Method,
    path: &str,
    body: Option<String>,
) -> Result<serde_json::Value, String> {
    let rt = runtime().map_err(|e| e.to_string())?;
    rt.block_on(crate::ops::admin::request(cfg, method, path, body))
        .map_err(|e| e.to_string())
}

pub(crate) fn run_erase(
    cfg: Config,
    study: Option<String>,
    patient: Option<String>,
    json: bool,
) -> ExitCode {
    let what = match (&study, &patient) {
        (Some(uid), _) => format!("study {uid}"),
        (_, Some(id)) => format!("patient {id}"),
        _ => unreachable!("clap requires one"),
    };
    let body = serde_json::to_string(&crate::ops::admin::EraseRequest { study, patient })
        .unwrap_or_default();
    let result = admin_call(&cfg, hyper::Method::POST, "/v1/erase", Some(body));
    let v = match result {
        Ok(v) => v,
        Err(e) => {
            eprintln!("dicomchain: erase {what}: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{v}");
        return ExitCode::SUCCESS;
    }
    match serde_json::from_value::<crate::ops::admin::EraseView>(v) {
        Ok(view) => {
            println!(
                "erased {what}: {} instance(s), {} stored version(s), {} pixel object(s) deleted{}; erasure entry {}",
                view.sop_instance_uids.len(),
                view.versions,
                view.objects_deleted,
                if view.objects_left > 0 {
                    format!(
                        " ({} more shredded, still being deleted by the node)",
                        view.objects_left
                    )
                } else {
                    String::new()
                },
                view.entries
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("dicomchain: erase {what}: unexpected answer: {e}");
            ExitCode::from(2)
        }
    }
}

pub(crate) fn run_permissions(cfg: Config, json: bool) -> ExitCode {
    let result = admin_call(&cfg, hyper::Method::GET, "/v1/permissions", None);
    let v = match result {
        Ok(v) => v,
        Err(e) => {
            eprintln!("dicomchain: {e}");
            return ExitCode::from(2);
        }
    };
    if json {
        println!("{v:#}");
        return ExitCode::SUCCESS;
    }
    let view: crate::ops::admin::PermissionsView = match serde_json::from_value(v) {
        Ok(view) => view,
        Err(e) => {
            eprintln!("dicomchain: unexpected answer: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "unknown AE titles: {}",
        if view.allow_unknown_peers {
            "allowed (everything)"
        } else {
            "refused"
        }
    );
    for p in view.peers {
        let perms: Vec<&str> = p.permissions.iter().map(|x| x.name()).collect();
        let from = if p.allowed_addresses.is_empty() {
            "any address".to_string()
        } else {
            p.allowed_addresses.join(", ")
        };
        println!(
            "{:<16} {:<26} from {from}",
            p.ae,
            if perms.is_empty() {
                "-".to_string()
            } else {
                perms.join(",")
            }
        );
        for c in p.changes {
            let names: Vec<&str> = c.permissions.iter().map(|x| x.name()).collect();
            println!(
                "    entry {}: {} {}",
                c.seq,
                if c.grant { "granted" } else { "revoked" },
                names.join(",")
            );
        }
    }
    ExitCode::SUCCESS
}

pub(crate) fn run_forward(cfg: Config, action: ForwardAction) -> ExitCode {
    use crate::forward;
    match action {
        ForwardAction::Status { json } => match forward::status(&cfg) {
            Ok(list) => {
                if json {
                    match serde_json::to_string_pretty(&list) {
                        Ok(t) => println!("{t}"),
                        Err(e) => {
                            eprintln!("dicomchain: {e}");
                            return ExitCode::FAILURE;
                        }
                    }
                } else {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_micros() as i64)
                        .unwrap_or(0);
                    print!("{}", forward::render_status(&list, now));
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("dicomchain: forward status: {e}");
                ExitCode::FAILURE
            }
        },
        ForwardAction::Retry { destination } => {
            match forward::retry(&cfg, destination.as_deref()) {
                Ok(n) => {
                    println!("re-queued {n} given-up item(s)");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("dicomchain: forward retry: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
