//! Arrow record batches → PostgreSQL binary `COPY` format.
//!
//! Binary COPY is the fastest way into PostgreSQL and exact for every type
//! the views use: `text`, `bigint`, `integer`, `double precision`,
//! `timestamptz`. The encoder
//! writes the columns of a batch in order; the target table (or temporary
//! table) must have the same columns in the same order.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Float64Type, Int32Type, Int64Type, TimeUnit, TimestampMicrosecondType};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("column {column:?} has type {data_type}, which binary COPY here does not encode")]
    Unsupported { column: String, data_type: DataType },
}

/// Checks up front that every column of `batch` can be encoded.
fn check(batch: &RecordBatch) -> Result<(), CopyError> {
    for field in batch.schema().fields() {
        let ok = matches!(
            field.data_type(),
            DataType::Utf8
                | DataType::LargeUtf8
                | DataType::Utf8View
                | DataType::Int64
                | DataType::Int32
                | DataType::Float64
                | DataType::Binary
                | DataType::Timestamp(TimeUnit::Microsecond, _)
        );
        if !ok {
            return Err(CopyError::Unsupported { column: field.name().clone(), data_type: field.data_type().clone() });
        }
    }
    Ok(())
}

/// The whole COPY payload (header, rows, trailer) of `batches`.
pub fn encode(batches: &[RecordBatch]) -> Result<Vec<u8>, CopyError> {
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
    out.extend_from_slice(&0i32.to_be_bytes()); // flags
    out.extend_from_slice(&0i32.to_be_bytes()); // header extension
    for batch in batches {
        check(batch)?;
        let columns = batch.columns();
        let n_cols = i16::try_from(columns.len()).expect("fewer than 32768 columns");
        for row in 0..batch.num_rows() {
            out.extend_from_slice(&n_cols.to_be_bytes());
            for col in columns {
                encode_value(&mut out, col.as_ref(), row);
            }
        }
    }
    out.extend_from_slice(&(-1i16).to_be_bytes());
    Ok(out)
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = i32::try_from(bytes.len()).expect("a value under 2 GiB");
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

fn encode_value(out: &mut Vec<u8>, col: &dyn Array, row: usize) {
    if col.is_null(row) {
        out.extend_from_slice(&(-1i32).to_be_bytes());
        return;
    }
    match col.data_type() {
        DataType::Utf8 => put_bytes(out, col.as_string::<i32>().value(row).as_bytes()),
        DataType::LargeUtf8 => put_bytes(out, col.as_string::<i64>().value(row).as_bytes()),
        DataType::Utf8View => put_bytes(out, col.as_string_view().value(row).as_bytes()),
        DataType::Int64 => put_bytes(out, &col.as_primitive::<Int64Type>().value(row).to_be_bytes()),
        DataType::Int32 => put_bytes(out, &col.as_primitive::<Int32Type>().value(row).to_be_bytes()),
        DataType::Float64 => put_bytes(out, &col.as_primitive::<Float64Type>().value(row).to_be_bytes()),
        DataType::Binary => put_bytes(out, col.as_binary::<i32>().value(row)),
        DataType::Timestamp(TimeUnit::Microsecond, _) => {
            let micros = col.as_primitive::<TimestampMicrosecondType>().value(row) - PG_EPOCH_OFFSET_MICROS;
            put_bytes(out, &micros.to_be_bytes());
        }
        other => unreachable!("checked before encoding: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float32Array, Float64Array, Int64Array, StringArray, TimestampMicrosecondArray};
    use arrow::datatypes::{Field, Schema};
    use std::sync::Arc;

    #[test]
    fn encodes_header_rows_nulls_and_trailer() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("t", DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())), true),
            Field::new("s", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampMicrosecondArray::from(vec![Some(PG_EPOCH_OFFSET_MICROS + 1)]).with_timezone("UTC")),
                Arc::new(StringArray::from(vec![Some("ab")])),
                Arc::new(Int64Array::from(vec![None::<i64>])),
            ],
        )
        .unwrap();
        let bytes = encode(&[batch]).unwrap();
        let mut expected = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        expected.extend_from_slice(&3i16.to_be_bytes());
        expected.extend_from_slice(&8i32.to_be_bytes());
        expected.extend_from_slice(&1i64.to_be_bytes());
        expected.extend_from_slice(&2i32.to_be_bytes());
        expected.extend_from_slice(b"ab");
        expected.extend_from_slice(&(-1i32).to_be_bytes());
        expected.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(bytes, expected);
    }

    #[test]
    fn bytes_are_written_as_they_are() {
        let schema = Arc::new(Schema::new(vec![Field::new("b", DataType::Binary, false)]));
        let bytes: Vec<&[u8]> = vec![b"\x00\xff"];
        let batch = RecordBatch::try_new(schema, vec![Arc::new(arrow::array::BinaryArray::from(bytes))]).unwrap();
        let out = encode(&[batch]).unwrap();
        let row = &out[19..out.len() - 2];
        assert_eq!(row, [&1i16.to_be_bytes()[..], &2i32.to_be_bytes(), b"\x00\xff"].concat());
    }

    #[test]
    fn doubles_are_big_endian_ieee() {
        let schema = Arc::new(Schema::new(vec![Field::new("f", DataType::Float64, false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Float64Array::from(vec![0.25]))]).unwrap();
        let bytes = encode(&[batch]).unwrap();
        assert_eq!(&bytes[21..33], [&8i32.to_be_bytes()[..], &0.25f64.to_be_bytes()[..]].concat());
    }

    #[test]
    fn unsupported_types_are_refused_by_name() {
        let schema = Arc::new(Schema::new(vec![Field::new("f", DataType::Float32, false)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Float32Array::from(vec![1.0]))]).unwrap();
        let err = encode(&[batch]).unwrap_err().to_string();
        assert!(err.contains("\"f\""), "{err}");
    }
}
