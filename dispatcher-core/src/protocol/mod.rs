//! The wire protocol of the dispatcher server (the book's "The wire protocol",
//! `docs/src/reference/protocol.md`).
//!
//! Every type here serializes to exactly the JSON the Python `dispatcher-server`
//! speaks, so workers written for it work unchanged. Fields this project adds are
//! optional on input and additive on output.
//!
//! - `work.rs`: `GET /work`, work items, journal entries;
//! - `results.rs`: `POST /results` and `/release`, read leniently, and the
//!   check that a result is one JSON value;
//! - `heartbeat.rs`: `POST /heartbeat`, token and prefix cache counts;
//! - `status.rs`: `GET /status`, `POST /hello`, the error answer.

mod heartbeat;
mod results;
mod status;
mod work;

pub use heartbeat::*;
pub use results::*;
pub use status::*;
pub use work::*;

pub(crate) use results::without_python_constants;
#[cfg(feature = "parquet")]
pub(crate) use results::{replace_python_constants, PYTHON_CONSTANTS};

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path that reads a line into values and writes it again (a
    /// task's typed input, run-batch's bodies, results) gives each float
    /// back to its last digit: the workspace reads JSON with serde_json's
    /// `float_roundtrip` (its default parser may be one unit off, as
    /// `90.33333333333333` -> `...31` once showed).
    #[test]
    fn a_float_read_and_written_again_is_the_same_to_the_last_digit() {
        let mut changed = Vec::new();
        for i in 0..200_000u32 {
            let x = f64::from(i) / 3.0 + 90.0 + f64::from(i % 7) * 1e-9;
            let text = format!("[{x:?},{:?}]", x * 1e-300);
            let back = serde_json::from_str::<serde_json::Value>(&text)
                .unwrap()
                .to_string();
            if back != text {
                changed.push((text, back));
            }
        }
        assert!(
            changed.is_empty(),
            "{} changed, as {:?}",
            changed.len(),
            changed.first()
        );
    }

    #[test]
    fn work_item_round_trips_python_json() {
        let py = r#"{"work_id": 7, "content": "{\"a\": 1}", "result": null, "retry_count": 0, "max_retries": 3}"#;
        let item: WorkItem = serde_json::from_str(py).unwrap();
        assert_eq!(item.work_id, 7);
        assert_eq!(item.content, r#"{"a": 1}"#);
        assert_eq!(item.max_retries, Some(3));
        let back: serde_json::Value = serde_json::to_value(&item).unwrap();
        assert_eq!(
            back,
            serde_json::json!({"work_id": 7, "content": "{\"a\": 1}", "result": null, "retry_count": 0, "max_retries": 3})
        );
    }

    #[test]
    fn status_strings_match_the_protocol() {
        for (s, text) in [
            (WorkStatus::Ok, "\"OK\""),
            (WorkStatus::Retry, "\"retry\""),
            (WorkStatus::AllWorkComplete, "\"all_work_complete\""),
        ] {
            assert_eq!(serde_json::to_string(&s).unwrap(), text);
            assert_eq!(format!("\"{}\"", s.as_str()), text);
        }
    }
}
