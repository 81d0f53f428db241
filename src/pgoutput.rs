//! Decoder of `pgoutput` logical replication messages, protocol version 1 (PostgreSQL 15 docs, "Logical
//! Replication Message Formats"): the payload of one `XLogData` in, one typed [`Message`] out.
//!
//! Pure and borrowing: names and column values are slices of the input, so decoding an insert costs one
//! allocation (the tuple's column vector) however wide the row is. Every read is checked, in the style of
//! postgres-protocol: bytes from the network can be truncated or corrupt, and a decoder that panics would take
//! the replication stream (and with it every delivery) down. Declared counts and lengths are never trusted for
//! allocation sizes; a vector is sized by what the remaining bytes could actually hold.
//!
//! Version 1 is the format the source negotiates (`proto_version '1'`, no `streaming`, no `binary`), so the
//! streamed-transaction `xid` fields of versions 2+ are never present. `'b'` (binary) column values are decoded
//! anyway since they cost nothing. Tags that version 1 never sends (stream and two-phase messages, or anything
//! newer) decode to [`Message::Other`] rather than an error: the bytes are not malformed, they are simply not
//! ours to interpret, and the source decides (it should refuse them, since under version 1 they mean the
//! server speaks a protocol other than the one negotiated, and skipping could lose rows).

use crate::lsn::Lsn;

/// One decoded pgoutput message. Timestamps are microseconds since the PostgreSQL epoch (2000-01-01 UTC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message<'a> {
    /// `'B'`: a transaction starts; `final_lsn` is the LSN of its commit record.
    Begin {
        final_lsn: Lsn,
        commit_time_us: i64,
        xid: u32,
    },
    /// `'C'`: the transaction commits; `end_lsn` is the position to acknowledge once it is processed.
    Commit {
        flags: u8,
        commit_lsn: Lsn,
        end_lsn: Lsn,
        commit_time_us: i64,
    },
    /// `'O'`: the transaction was replicated from another origin.
    Origin { commit_lsn: Lsn, name: &'a str },
    /// `'R'`: describes a relation before the first row change that uses it (and again after DDL).
    Relation {
        id: u32,
        /// Empty for `pg_catalog`.
        namespace: &'a str,
        name: &'a str,
        /// `relreplident`: `d`efault, `n`othing, `f`ull or `i`ndex.
        replica_identity: u8,
        columns: Vec<Column<'a>>,
    },
    /// `'Y'`: describes a non-builtin type used by a following relation.
    Type {
        id: u32,
        namespace: &'a str,
        name: &'a str,
    },
    /// `'I'`: a new row.
    Insert { relation_id: u32, tuple: Tuple<'a> },
    /// `'U'`: a changed row, with the old key or old row when the replica identity provides one.
    Update {
        relation_id: u32,
        old: Option<OldTuple<'a>>,
        new: Tuple<'a>,
    },
    /// `'D'`: a deleted row, identified by its old key or old row.
    Delete { relation_id: u32, old: OldTuple<'a> },
    /// `'T'`: tables truncated; `options` is a bit set of [`TRUNCATE_CASCADE`] and [`TRUNCATE_RESTART_IDENTITY`].
    Truncate { options: u8, relation_ids: Vec<u32> },
    /// `'M'`: a `pg_logical_emit_message` message.
    LogicalMessage {
        transactional: bool,
        lsn: Lsn,
        prefix: &'a str,
        content: &'a [u8],
    },
    /// A tag that protocol version 1 does not define; see the module documentation.
    Other { tag: u8 },
}

/// `Truncate::options` bit: `TRUNCATE ... CASCADE`.
pub const TRUNCATE_CASCADE: u8 = 1;
/// `Truncate::options` bit: `TRUNCATE ... RESTART IDENTITY`.
pub const TRUNCATE_RESTART_IDENTITY: u8 = 2;

/// A column of a [`Message::Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column<'a> {
    /// Bit 1 set: the column is part of the replica identity key.
    pub flags: u8,
    pub name: &'a str,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// One column value of a [`Tuple`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datum<'a> {
    /// `'n'`: SQL NULL.
    Null,
    /// `'u'`: an unchanged TOASTed value that the server did not send.
    Unchanged,
    /// `'t'`: the value in its text output form.
    Text(&'a [u8]),
    /// `'b'`: the value in its binary send form.
    Binary(&'a [u8]),
}

/// A row: one [`Datum`] per column, in the order of the relation's columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuple<'a> {
    pub columns: Vec<Datum<'a>>,
}

/// The "before" image sent with updates and deletes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple<'a> {
    /// `'K'`: only the replica identity key columns are meaningful (others are null).
    Key(Tuple<'a>),
    /// `'O'`: the whole old row (`REPLICA IDENTITY FULL`).
    Full(Tuple<'a>),
}

/// Why a message could not be decoded. These mean a corrupt stream or a protocol mismatch, not a user
/// mistake, so they name the field that failed to help whoever reads the bug report.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("empty pgoutput message")]
    Empty,
    #[error("pgoutput message truncated while reading {what}")]
    Truncated { what: &'static str },
    #[error("pgoutput {what} is not valid UTF-8; the replication connection must use client_encoding UTF8")]
    InvalidUtf8 { what: &'static str },
    #[error("pgoutput {what} has negative length {len}")]
    NegativeLength { what: &'static str, len: i32 },
    #[error("unknown pgoutput tuple column kind {0:#04x}; expected 'n', 'u', 't' or 'b'")]
    UnknownTupleKind(u8),
    #[error(
        "unexpected byte {byte:#04x} in pgoutput {message} message where a tuple marker belongs"
    )]
    UnexpectedTupleMarker { message: &'static str, byte: u8 },
    #[error("{count} unexpected bytes after a pgoutput {message} message; is the stream protocol version 1?")]
    TrailingBytes { message: &'static str, count: usize },
}

/// Decodes one pgoutput message (the `XLogData` payload, starting with its tag byte).
pub fn decode(bytes: &[u8]) -> Result<Message<'_>, DecodeError> {
    let (&tag, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader { buf: body };
    let (message, name) = match tag {
        b'B' => (
            Message::Begin {
                final_lsn: Lsn(r.u64("begin final lsn")?),
                commit_time_us: r.i64("begin commit timestamp")?,
                xid: r.u32("begin xid")?,
            },
            "begin",
        ),
        b'C' => (
            Message::Commit {
                flags: r.u8("commit flags")?,
                commit_lsn: Lsn(r.u64("commit lsn")?),
                end_lsn: Lsn(r.u64("commit end lsn")?),
                commit_time_us: r.i64("commit timestamp")?,
            },
            "commit",
        ),
        b'O' => (
            Message::Origin {
                commit_lsn: Lsn(r.u64("origin commit lsn")?),
                name: r.str("origin name")?,
            },
            "origin",
        ),
        b'R' => (relation(&mut r)?, "relation"),
        b'Y' => (
            Message::Type {
                id: r.u32("type oid")?,
                namespace: r.str("type namespace")?,
                name: r.str("type name")?,
            },
            "type",
        ),
        b'I' => {
            let relation_id = r.u32("insert relation id")?;
            match r.u8("insert tuple marker")? {
                b'N' => {}
                byte => {
                    return Err(DecodeError::UnexpectedTupleMarker {
                        message: "insert",
                        byte,
                    })
                }
            }
            (
                Message::Insert {
                    relation_id,
                    tuple: r.tuple()?,
                },
                "insert",
            )
        }
        b'U' => {
            let relation_id = r.u32("update relation id")?;
            // An optional old key ('K') or old row ('O') precedes the mandatory new row ('N').
            let (old, marker) = match r.u8("update tuple marker")? {
                b'K' => (
                    Some(OldTuple::Key(r.tuple()?)),
                    r.u8("update new tuple marker")?,
                ),
                b'O' => (
                    Some(OldTuple::Full(r.tuple()?)),
                    r.u8("update new tuple marker")?,
                ),
                byte => (None, byte),
            };
            if marker != b'N' {
                return Err(DecodeError::UnexpectedTupleMarker {
                    message: "update",
                    byte: marker,
                });
            }
            (
                Message::Update {
                    relation_id,
                    old,
                    new: r.tuple()?,
                },
                "update",
            )
        }
        b'D' => {
            let relation_id = r.u32("delete relation id")?;
            let old = match r.u8("delete tuple marker")? {
                b'K' => OldTuple::Key(r.tuple()?),
                b'O' => OldTuple::Full(r.tuple()?),
                byte => {
                    return Err(DecodeError::UnexpectedTupleMarker {
                        message: "delete",
                        byte,
                    })
                }
            };
            (Message::Delete { relation_id, old }, "delete")
        }
        b'T' => {
            let count = r.u32("truncate relation count")?;
            let options = r.u8("truncate options")?;
            let mut relation_ids = Vec::with_capacity(r.capacity_for(count, 4));
            for _ in 0..count {
                relation_ids.push(r.u32("truncate relation id")?);
            }
            (
                Message::Truncate {
                    options,
                    relation_ids,
                },
                "truncate",
            )
        }
        b'M' => {
            let flags = r.u8("message flags")?;
            let lsn = Lsn(r.u64("message lsn")?);
            let prefix = r.str("message prefix")?;
            let len = r.len("message content")?;
            let content = r.bytes(len, "message content")?;
            (
                Message::LogicalMessage {
                    transactional: flags & 1 != 0,
                    lsn,
                    prefix,
                    content,
                },
                "logical decoding",
            )
        }
        tag => return Ok(Message::Other { tag }),
    };
    // Version 1 messages have no optional tail: leftovers mean we decoded a different layout than was sent.
    if !r.buf.is_empty() {
        return Err(DecodeError::TrailingBytes {
            message: name,
            count: r.buf.len(),
        });
    }
    Ok(message)
}

fn relation<'a>(r: &mut Reader<'a>) -> Result<Message<'a>, DecodeError> {
    let id = r.u32("relation id")?;
    let namespace = r.str("relation namespace")?;
    let name = r.str("relation name")?;
    let replica_identity = r.u8("relation replica identity")?;
    let count = r.u16("relation column count")?;
    // Smallest column: flags, empty name's NUL, type oid, type modifier.
    let mut columns = Vec::with_capacity(r.capacity_for(count.into(), 10));
    for _ in 0..count {
        columns.push(Column {
            flags: r.u8("column flags")?,
            name: r.str("column name")?,
            type_oid: r.u32("column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Message::Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// A cursor over the message body whose every read is bounds-checked.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let (head, rest) = self
            .buf
            .split_at_checked(n)
            .ok_or(DecodeError::Truncated { what })?;
        self.buf = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let head = self.bytes(N, what)?;
        Ok(head.try_into().expect("bytes(N) returns exactly N bytes"))
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        self.array(what).map(u16::from_be_bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        self.array(what).map(u32::from_be_bytes)
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        self.array(what).map(i32::from_be_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        self.array(what).map(u64::from_be_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        self.array(what).map(i64::from_be_bytes)
    }

    /// An `Int32` length prefix, refused when negative.
    fn len(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let len = self.i32(what)?;
        usize::try_from(len).map_err(|_| DecodeError::NegativeLength { what, len })
    }

    /// A NUL-terminated string (the protocol's `String`).
    fn str(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::Truncated { what })?;
        let s =
            std::str::from_utf8(&self.buf[..end]).map_err(|_| DecodeError::InvalidUtf8 { what })?;
        self.buf = &self.buf[end + 1..];
        Ok(s)
    }

    /// `TupleData`: an `Int16` column count, then one kind byte (and maybe a value) per column.
    fn tuple(&mut self) -> Result<Tuple<'a>, DecodeError> {
        let count = self.u16("tuple column count")?;
        let mut columns = Vec::with_capacity(self.capacity_for(count.into(), 1));
        for _ in 0..count {
            columns.push(match self.u8("tuple column kind")? {
                b'n' => Datum::Null,
                b'u' => Datum::Unchanged,
                b't' => {
                    let len = self.len("text column length")?;
                    Datum::Text(self.bytes(len, "text column value")?)
                }
                b'b' => {
                    let len = self.len("binary column length")?;
                    Datum::Binary(self.bytes(len, "binary column value")?)
                }
                kind => return Err(DecodeError::UnknownTupleKind(kind)),
            });
        }
        Ok(Tuple { columns })
    }

    /// A vector capacity for `count` declared items of at least `min_size` bytes each: never more than the
    /// remaining bytes can hold, so a corrupt count cannot make us allocate gigabytes.
    fn capacity_for(&self, count: u32, min_size: usize) -> usize {
        usize::try_from(count)
            .unwrap_or(usize::MAX)
            .min(self.buf.len() / min_size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds messages the way the server's `logicalrep_write_*` functions do.
    #[derive(Default)]
    struct Enc(Vec<u8>);

    impl Enc {
        fn tag(t: u8) -> Self {
            Enc(vec![t])
        }
        fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i32(mut self, v: i32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn u64(mut self, v: u64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn i64(mut self, v: i64) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        fn raw(mut self, b: &[u8]) -> Self {
            self.0.extend_from_slice(b);
            self
        }
        fn str(self, s: &str) -> Self {
            self.raw(s.as_bytes()).u8(0)
        }
        fn tuple(mut self, cols: &[Datum]) -> Self {
            self = self.u16(cols.len() as u16);
            for d in cols {
                self = match d {
                    Datum::Null => self.u8(b'n'),
                    Datum::Unchanged => self.u8(b'u'),
                    Datum::Text(v) => self.u8(b't').i32(v.len() as i32).raw(v),
                    Datum::Binary(v) => self.u8(b'b').i32(v.len() as i32).raw(v),
                };
            }
            self
        }
    }

    const ROW: [Datum<'static>; 5] = [
        Datum::Text(b"42"),
        Datum::Text(b"order.created"),
        Datum::Null,
        Datum::Unchanged,
        Datum::Binary(&[0, 1, 2]),
    ];

    /// One well-formed fixture per message kind (and per update/delete variant), with what it decodes to.
    fn fixtures() -> Vec<(Vec<u8>, Message<'static>)> {
        let row = || Tuple {
            columns: ROW.to_vec(),
        };
        let key = || Tuple {
            columns: vec![Datum::Text(b"42"), Datum::Null],
        };
        vec![
            (
                Enc::tag(b'B')
                    .u64(0x16_B374_D848)
                    .i64(767_000_000_123_456)
                    .u32(4_000_000_000)
                    .0,
                Message::Begin {
                    final_lsn: Lsn(0x16_B374_D848),
                    commit_time_us: 767_000_000_123_456,
                    xid: 4_000_000_000,
                },
            ),
            (
                Enc::tag(b'C').u8(0).u64(10).u64(20).i64(-5).0,
                Message::Commit {
                    flags: 0,
                    commit_lsn: Lsn(10),
                    end_lsn: Lsn(20),
                    commit_time_us: -5,
                },
            ),
            (
                Enc::tag(b'O').u64(7).str("upstream").0,
                Message::Origin {
                    commit_lsn: Lsn(7),
                    name: "upstream",
                },
            ),
            (
                Enc::tag(b'R')
                    .u32(16384)
                    .str("walhook")
                    .str("outbox")
                    .u8(b'd')
                    .u16(3)
                    .u8(1)
                    .str("id")
                    .u32(20)
                    .i32(-1)
                    .u8(0)
                    .str("event_type")
                    .u32(25)
                    .i32(-1)
                    .u8(0)
                    .str("payload")
                    .u32(3802)
                    .i32(-1)
                    .0,
                Message::Relation {
                    id: 16384,
                    namespace: "walhook",
                    name: "outbox",
                    replica_identity: b'd',
                    columns: vec![
                        Column {
                            flags: 1,
                            name: "id",
                            type_oid: 20,
                            type_modifier: -1,
                        },
                        Column {
                            flags: 0,
                            name: "event_type",
                            type_oid: 25,
                            type_modifier: -1,
                        },
                        Column {
                            flags: 0,
                            name: "payload",
                            type_oid: 3802,
                            type_modifier: -1,
                        },
                    ],
                },
            ),
            (
                Enc::tag(b'R').u32(1).str("").str("t").u8(b'n').u16(0).0,
                Message::Relation {
                    id: 1,
                    namespace: "",
                    name: "t",
                    replica_identity: b'n',
                    columns: vec![],
                },
            ),
            (
                Enc::tag(b'Y').u32(70000).str("public").str("mood").0,
                Message::Type {
                    id: 70000,
                    namespace: "public",
                    name: "mood",
                },
            ),
            (
                Enc::tag(b'I').u32(16384).u8(b'N').tuple(&ROW).0,
                Message::Insert {
                    relation_id: 16384,
                    tuple: row(),
                },
            ),
            (
                Enc::tag(b'I').u32(5).u8(b'N').tuple(&[]).0,
                Message::Insert {
                    relation_id: 5,
                    tuple: Tuple { columns: vec![] },
                },
            ),
            (
                Enc::tag(b'U').u32(9).u8(b'N').tuple(&ROW).0,
                Message::Update {
                    relation_id: 9,
                    old: None,
                    new: row(),
                },
            ),
            (
                Enc::tag(b'U')
                    .u32(9)
                    .u8(b'K')
                    .tuple(&key().columns)
                    .u8(b'N')
                    .tuple(&ROW)
                    .0,
                Message::Update {
                    relation_id: 9,
                    old: Some(OldTuple::Key(key())),
                    new: row(),
                },
            ),
            (
                Enc::tag(b'U')
                    .u32(9)
                    .u8(b'O')
                    .tuple(&ROW)
                    .u8(b'N')
                    .tuple(&ROW)
                    .0,
                Message::Update {
                    relation_id: 9,
                    old: Some(OldTuple::Full(row())),
                    new: row(),
                },
            ),
            (
                Enc::tag(b'D').u32(9).u8(b'K').tuple(&key().columns).0,
                Message::Delete {
                    relation_id: 9,
                    old: OldTuple::Key(key()),
                },
            ),
            (
                Enc::tag(b'D').u32(9).u8(b'O').tuple(&ROW).0,
                Message::Delete {
                    relation_id: 9,
                    old: OldTuple::Full(row()),
                },
            ),
            (
                Enc::tag(b'T')
                    .u32(2)
                    .u8(TRUNCATE_CASCADE | TRUNCATE_RESTART_IDENTITY)
                    .u32(16384)
                    .u32(16390)
                    .0,
                Message::Truncate {
                    options: 3,
                    relation_ids: vec![16384, 16390],
                },
            ),
            (
                Enc::tag(b'M')
                    .u8(1)
                    .u64(99)
                    .str("walhook")
                    .i32(5)
                    .raw(b"hello")
                    .0,
                Message::LogicalMessage {
                    transactional: true,
                    lsn: Lsn(99),
                    prefix: "walhook",
                    content: b"hello",
                },
            ),
            (
                Enc::tag(b'M').u8(0).u64(99).str("").i32(0).0,
                Message::LogicalMessage {
                    transactional: false,
                    lsn: Lsn(99),
                    prefix: "",
                    content: b"",
                },
            ),
        ]
    }

    #[test]
    fn decodes_every_message_kind() {
        for (bytes, expected) in fixtures() {
            assert_eq!(decode(&bytes), Ok(expected), "{bytes:?}");
        }
    }

    #[test]
    fn every_truncation_of_every_fixture_is_an_error() {
        for (bytes, _) in fixtures() {
            for len in 0..bytes.len() {
                assert!(
                    decode(&bytes[..len]).is_err(),
                    "prefix {len} of {bytes:?} decoded"
                );
            }
        }
        assert_eq!(decode(&[]), Err(DecodeError::Empty));
    }

    #[test]
    fn trailing_bytes_are_refused() {
        for (mut bytes, _) in fixtures() {
            bytes.push(0);
            assert!(
                matches!(
                    decode(&bytes),
                    Err(DecodeError::TrailingBytes { count: 1, .. })
                ),
                "{bytes:?}"
            );
        }
    }

    #[test]
    fn unknown_tags_are_other_not_errors() {
        // Stream start/stop/commit/abort and two-phase tags never appear under version 1.
        for tag in [
            b'S', b'E', b'c', b'A', b'b', b'P', b'K', b'r', b'p', 0, 0xff,
        ] {
            assert_eq!(decode(&[tag, 1, 2, 3]), Ok(Message::Other { tag }));
        }
    }

    #[test]
    fn wrong_tuple_kinds_and_markers_are_errors() {
        let bad_kind = Enc::tag(b'I').u32(1).u8(b'N').u16(1).u8(b'x').0;
        assert_eq!(decode(&bad_kind), Err(DecodeError::UnknownTupleKind(b'x')));
        let insert_marker = Enc::tag(b'I').u32(1).u8(b'K').tuple(&ROW).0;
        assert_eq!(
            decode(&insert_marker),
            Err(DecodeError::UnexpectedTupleMarker {
                message: "insert",
                byte: b'K'
            })
        );
        let update_marker = Enc::tag(b'U').u32(1).u8(b'X').tuple(&ROW).0;
        assert_eq!(
            decode(&update_marker),
            Err(DecodeError::UnexpectedTupleMarker {
                message: "update",
                byte: b'X'
            })
        );
        // After an old tuple, only the new tuple may follow.
        let update_twice = Enc::tag(b'U')
            .u32(1)
            .u8(b'K')
            .tuple(&ROW)
            .u8(b'K')
            .tuple(&ROW)
            .0;
        assert_eq!(
            decode(&update_twice),
            Err(DecodeError::UnexpectedTupleMarker {
                message: "update",
                byte: b'K'
            })
        );
        let delete_marker = Enc::tag(b'D').u32(1).u8(b'N').tuple(&ROW).0;
        assert_eq!(
            decode(&delete_marker),
            Err(DecodeError::UnexpectedTupleMarker {
                message: "delete",
                byte: b'N'
            })
        );
    }

    #[test]
    fn invalid_utf8_names_are_errors() {
        let relation = Enc::tag(b'R')
            .u32(1)
            .str("public")
            .raw(&[0xff, 0xfe, 0])
            .u8(b'd')
            .u16(0)
            .0;
        assert_eq!(
            decode(&relation),
            Err(DecodeError::InvalidUtf8 {
                what: "relation name"
            })
        );
        let column = Enc::tag(b'R')
            .u32(1)
            .str("public")
            .str("t")
            .u8(b'd')
            .u16(1)
            .u8(0)
            .raw(&[b'a', 0xc0, 0])
            .0;
        assert_eq!(
            decode(&column),
            Err(DecodeError::InvalidUtf8 {
                what: "column name"
            })
        );
        let prefix = Enc::tag(b'M').u8(0).u64(1).raw(&[0x80, 0]).i32(0).0;
        assert_eq!(
            decode(&prefix),
            Err(DecodeError::InvalidUtf8 {
                what: "message prefix"
            })
        );
        // Column values are bytes, not text, so invalid UTF-8 there is fine.
        let value = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .tuple(&[Datum::Text(&[0xff])])
            .0;
        assert!(decode(&value).is_ok());
    }

    #[test]
    fn huge_and_negative_declared_lengths_are_errors() {
        let huge_text = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .i32(0x7fff_ffff)
            .raw(b"abc")
            .0;
        assert_eq!(
            decode(&huge_text),
            Err(DecodeError::Truncated {
                what: "text column value"
            })
        );
        let huge_binary = Enc::tag(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b'b')
            .i32(0x7fff_ffff)
            .raw(b"abc")
            .0;
        assert_eq!(
            decode(&huge_binary),
            Err(DecodeError::Truncated {
                what: "binary column value"
            })
        );
        let negative = Enc::tag(b'I').u32(1).u8(b'N').u16(1).u8(b't').i32(-1).0;
        assert_eq!(
            decode(&negative),
            Err(DecodeError::NegativeLength {
                what: "text column length",
                len: -1
            })
        );
        let content = Enc::tag(b'M').u8(0).u64(1).str("p").i32(i32::MIN).0;
        assert_eq!(
            decode(&content),
            Err(DecodeError::NegativeLength {
                what: "message content",
                len: i32::MIN
            })
        );
        let huge_content = Enc::tag(b'M')
            .u8(0)
            .u64(1)
            .str("p")
            .i32(0x7fff_ffff)
            .raw(b"abc")
            .0;
        assert_eq!(
            decode(&huge_content),
            Err(DecodeError::Truncated {
                what: "message content"
            })
        );
        // Declared counts far beyond the bytes present: an error, and no giant allocation on the way.
        let columns = Enc::tag(b'I').u32(1).u8(b'N').u16(u16::MAX).u8(b'n').0;
        assert_eq!(
            decode(&columns),
            Err(DecodeError::Truncated {
                what: "tuple column kind"
            })
        );
        let relations = Enc::tag(b'T').u32(u32::MAX).u8(0).u32(1).0;
        assert_eq!(
            decode(&relations),
            Err(DecodeError::Truncated {
                what: "truncate relation id"
            })
        );
        let relation_columns = Enc::tag(b'R')
            .u32(1)
            .str("")
            .str("t")
            .u8(b'd')
            .u16(u16::MAX)
            .0;
        assert_eq!(
            decode(&relation_columns),
            Err(DecodeError::Truncated {
                what: "column flags"
            })
        );
    }

    #[test]
    fn error_messages_name_the_field() {
        assert_eq!(
            DecodeError::Truncated { what: "commit lsn" }.to_string(),
            "pgoutput message truncated while reading commit lsn"
        );
        assert_eq!(
            DecodeError::UnknownTupleKind(b'x').to_string(),
            "unknown pgoutput tuple column kind 0x78; expected 'n', 'u', 't' or 'b'"
        );
    }

    /// xorshift64*: deterministic, so a failure reproduces.
    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let tags = b"BCORYIUDTM";
        let mut buf = Vec::with_capacity(64);
        for i in 0..100_000 {
            buf.clear();
            let len = (rng.next() % 64) as usize;
            buf.extend((0..len).map(|_| rng.next() as u8));
            // Most inputs get a real tag and small bytes so that decoding goes deep, not just to Other.
            if i % 4 != 0 && !buf.is_empty() {
                buf[0] = tags[(rng.next() % tags.len() as u64) as usize];
                for b in &mut buf[1..] {
                    if rng.next() % 3 == 0 {
                        *b %= 4;
                    }
                }
            }
            let _ = decode(&buf);
        }
    }

    #[test]
    fn mutated_fixtures_never_panic() {
        let mut rng = XorShift(42);
        for (bytes, _) in fixtures() {
            for _ in 0..2_000 {
                let mut m = bytes.clone();
                let at = (rng.next() as usize) % m.len();
                m[at] = rng.next() as u8;
                let _ = decode(&m);
            }
        }
    }
}
