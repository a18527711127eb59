//! Plain-text tables and sizes for the explanations' `text()`.

/// Bytes for people: `1.2 MiB (1234567 bytes)` beyond a KiB, else `532 bytes`.
pub(crate) fn bytes(n: u64) -> String {
    if n < 1024 {
        format!("{n} bytes")
    } else {
        format!("{} ({n} bytes)", bytesize::ByteSize(n).display().iec())
    }
}

/// Bytes in a table cell: `1.2 MiB`.
pub(crate) fn size(n: u64) -> String {
    bytesize::ByteSize(n).display().iec().to_string()
}

/// `text` cut to `max` characters, ending in `…` when cut.
pub(crate) fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut out: String = text.chars().take(max.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Rows under a header, columns padded to their widest cell, two spaces apart.
pub(crate) fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let columns = header.len();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.zip(&widths).enumerate() {
            out.push_str(cell);
            if i + 1 < columns {
                let pad = width.saturating_sub(cell.chars().count()) + 2;
                out.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(&mut header.iter().copied());
    for row in rows {
        out += &line(&mut row.iter().map(String::as_str));
    }
    out
}

/// Seconds since the epoch as a UTC time, `2026-11-23T19:06:31Z`.
pub(crate) fn utc(seconds: i64) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_and_cut_long_text() {
        let rows = vec![
            vec!["1".to_owned(), "COPY . /app".to_owned()],
            vec!["10".to_owned(), "RUN make".to_owned()],
        ];
        assert_eq!(
            table(&["STEP", "A"], &rows),
            "STEP  A\n1     COPY . /app\n10    RUN make\n"
        );
        assert_eq!(cut("abcdef", 4), "abc…");
        assert_eq!(cut("abc", 4), "abc");
        assert_eq!(bytes(10), "10 bytes");
        assert!(bytes(2048).ends_with("(2048 bytes)"), "{}", bytes(2048));
        assert_eq!(utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc(1_795_460_791), "2026-11-23T19:06:31Z");
        assert_eq!(utc(951_782_400), "2000-02-29T00:00:00Z");
    }
}
