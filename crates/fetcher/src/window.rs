//! Planning modify-time windows, the unit of work fetchers share through the fetch queue, and the
//! windows as work items on it.

use std::time::Duration;

use chrono::{DateTime, SubsecRound as _, Utc};
use conveyor_amqp::envelope::{Envelope, Meta};
use conveyor_amqp::{Publisher, Topology};
use conveyor_base::source::Window;
use conveyor_base::{Record, Stage};
use serde_json::json;

/// Windows of `width` covering `from` to `to` (none if `to` is not after `from`).
pub fn cover(from: DateTime<Utc>, to: DateTime<Utc>, width: Duration) -> Vec<Window> {
    let width = chrono::Duration::from_std(width).unwrap_or(chrono::Duration::days(1));
    let mut windows = Vec::new();
    let mut start = from;
    while start < to {
        let end = (start + width).min(to);
        windows.push(Window { start, end });
        start = end;
    }
    windows
}

/// Like [`cover`], with the last `tail` of the range (at most all of it) in windows of its own: the
/// plan's tail is where late rows may still appear, and paging it apart keeps the older windows —
/// which no row can enter any more — from being paged twice (see [`crate::engine`]).
pub(crate) fn cover_with_tail(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    width: Duration,
    tail: Duration,
) -> Vec<Window> {
    let tail = chrono::Duration::from_std(tail).unwrap_or(chrono::Duration::MAX);
    let cut = to
        .checked_sub_signed(tail)
        .unwrap_or(from)
        .max(from)
        .min(to);
    let mut windows = cover(from, cut, width);
    windows.extend(cover(cut, to, width));
    windows
}

/// The two halves, for a window with too many rows to page through in one go. They meet on a whole
/// millisecond: windows travel as epoch milliseconds, and a half whose bound had a finer part would
/// never match its row in the sync state, so it could never be finished.
pub fn halves(window: &Window) -> [Window; 2] {
    let middle = (window.start + (window.end - window.start) / 2).trunc_subsecs(3);
    [
        Window {
            start: window.start,
            end: middle,
        },
        Window {
            start: middle,
            end: window.end,
        },
    ]
}

/// Whether a window can still be split (a window of a second cannot: times have second precision).
pub(crate) fn splittable(window: &Window) -> bool {
    window.end - window.start > chrono::Duration::seconds(2)
}

/// The window as a work item on the fetch queue.
pub(crate) fn to_work_item(window: Window) -> Record {
    let (start, end) = (
        window.start.timestamp_millis(),
        window.end.timestamp_millis(),
    );
    Record::new(
        format!("window:{start}-{end}"),
        window.start.fixed_offset(),
        &json!({"window_start": start, "window_end": end}),
    )
}

/// Publishes `windows` as work items on the pipeline's fetch queue; returns once every one is
/// confirmed.
pub async fn publish_work_items(
    publisher: &Publisher,
    topology: &Topology,
    windows: Vec<Window>,
) -> anyhow::Result<()> {
    let mut confirms = Vec::with_capacity(windows.len());
    for window in windows {
        let envelope = Envelope {
            meta: Meta::new_trace(topology.pipeline()),
            records: vec![to_work_item(window)],
        };
        let (body, properties) = envelope.to_amqp(topology.compression());
        confirms.push(
            publisher
                .send(
                    &topology.exchange(),
                    &topology.routing_key(Stage::Fetch),
                    &body,
                    properties,
                )
                .await?,
        );
    }
    for confirm in confirms {
        confirm.wait().await?;
    }
    Ok(())
}

/// Reads a work item.
pub(crate) fn from_work_item(record: &Record) -> Result<Window, String> {
    let data = record
        .fields()
        .map_err(|err| format!("work item {:?}: {err}", record.id))?;
    let millis = |field: &str| {
        data[field]
            .as_i64()
            .and_then(DateTime::from_timestamp_millis)
            .ok_or_else(|| format!("work item {:?} has no valid {field}", record.id))
    };
    let window = Window {
        start: millis("window_start")?,
        end: millis("window_end")?,
    };
    if window.end < window.start {
        return Err(format!("work item {:?} ends before it starts", record.id));
    }
    Ok(window)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(secs, 0).unwrap()
    }

    #[test]
    fn cover_cuts_the_range_into_windows_without_gaps() {
        let windows = cover(at(0), at(250), Duration::from_secs(100));
        assert_eq!(windows.len(), 3);
        assert_eq!(windows[0].start, at(0));
        assert_eq!(windows[2].end, at(250));
        for pair in windows.windows(2) {
            assert_eq!(pair[0].end, pair[1].start);
        }
        assert!(cover(at(10), at(10), Duration::from_secs(5)).is_empty());
    }

    #[test]
    fn the_tail_of_a_range_is_a_window_of_its_own() {
        let windows = cover_with_tail(
            at(0),
            at(250),
            Duration::from_secs(100),
            Duration::from_secs(30),
        );
        let bounds: Vec<(i64, i64)> = windows
            .iter()
            .map(|w| (w.start.timestamp(), w.end.timestamp()))
            .collect();
        assert_eq!(bounds, [(0, 100), (100, 200), (200, 220), (220, 250)]);
        // A tail as long as the range (or longer) is the whole range; no tail is plain cover.
        let all = cover_with_tail(at(0), at(50), Duration::from_secs(100), Duration::MAX);
        assert_eq!(
            all,
            [Window {
                start: at(0),
                end: at(50)
            }]
        );
        assert_eq!(
            cover_with_tail(at(0), at(250), Duration::from_secs(100), Duration::ZERO),
            cover(at(0), at(250), Duration::from_secs(100))
        );
    }

    #[test]
    fn halves_meet_in_the_middle() {
        let [first, second] = halves(&Window {
            start: at(0),
            end: at(100),
        });
        assert_eq!((first.end, second.start), (at(50), at(50)));
        // A middle between two milliseconds is the earlier one: bounds stay whole milliseconds.
        let odd = Window {
            start: at(0),
            end: at(0) + chrono::Duration::milliseconds(3),
        };
        let [first, second] = halves(&odd);
        assert_eq!(first.end, at(0) + chrono::Duration::milliseconds(1));
        assert_eq!(from_work_item(&to_work_item(first)).unwrap(), first);
        assert_eq!(second.start, first.end);
    }

    #[test]
    fn work_items_round_trip() {
        let window = Window {
            start: at(1_700_000_000),
            end: at(1_700_086_400),
        };
        assert_eq!(from_work_item(&to_work_item(window)).unwrap(), window);
        let mut broken = to_work_item(window);
        let mut data = broken.fields().unwrap();
        data["window_end"] = json!("soon");
        broken = Record::new(broken.id, broken.modify_time, &data);
        assert!(from_work_item(&broken).is_err());
    }
}
