//! Reads and checks the header of a GGUF model file.
//!
//! llmctl reads the header before anything is spawned, so a wrong or truncated file is
//! refused in milliseconds with exit 65 instead of a llama-server crash. The header also gives
//! the numbers for the memory estimate (tensor bytes, layers, KV width). This module reads
//! files; it never loads tensor data. The format is described in llama.cpp's `docs/gguf.md`.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;
/// The largest data alignment accepted: GGUF files use 32; a power of two up to 1 MiB is
/// plausible, anything else is a crafted header.
const MAX_ALIGNMENT: u64 = 1 << 20;

// Bounds on what a header may hold, so that no file can make the reader recurse, allocate
// or loop without limit. Each is far above what real models hold (measured: Gemma 3's
// header, with its 262,144-token vocabulary, is 6.2 MiB; SmolLM2's is 1.7 MiB).
/// The whole header (metadata and tensor list): 20 times Gemma 3's.
const MAX_HEADER_BYTES: u64 = 128 << 20;
/// One string value; chat templates, the longest strings real models carry, are tens of KiB.
const MAX_STRING_LEN: u64 = 16 << 20;
/// One key or tensor name: the GGUF specification caps keys at 65,535 bytes (and tensor
/// names at 64; llama.cpp checks that itself).
const MAX_KEY_LEN: u64 = u16::MAX as u64;
/// Elements of one array: 64 times the largest vocabulary in use (262,144 tokens).
const MAX_ARRAY_LEN: u64 = 1 << 24;
/// Arrays of arrays: the specification allows them, llama.cpp reads none and no real model
/// has one; a small bound keeps the reader's recursion far from the end of any stack.
const MAX_NESTING: u32 = 8;
/// Keys and tensors: models have tens of keys and at most a few thousand tensors.
const MAX_COUNT: u64 = 1 << 20;

/// What llmctl needs to know about a model file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelInfo {
    pub version: u32,
    pub architecture: String,
    pub name: Option<String>,
    pub context_length: Option<u64>,
    pub block_count: Option<u64>,
    pub embedding_length: Option<u64>,
    pub head_count: Option<u64>,
    pub head_count_kv: Option<u64>,
    pub tensor_count: u64,
    /// Bytes of tensor data the header describes.
    pub tensor_bytes: u64,
    pub file_size: u64,
    pub has_chat_template: bool,
    /// How an embedding model pools token vectors into one (llama.cpp's numbering); none
    /// for a model that does not say (a chat model).
    pub pooling_type: Option<u64>,
    /// What only `ls` and `show` need, boxed: the daemon keeps a `ModelInfo` in every job.
    pub details: Box<Details>,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Details {
    /// Weights in the file: the elements of every tensor (of this part, for a split model).
    pub parameter_count: u64,
    /// `general.file_type`: llama.cpp's name for how the weights are quantized.
    pub file_type: Option<u64>,
    /// The ggml type holding the most bytes, for files without `general.file_type`.
    pub dominant_type: Option<u32>,
    pub license: Option<String>,
    pub author: Option<String>,
    pub chat_template: Option<String>,
    /// Parts of a split model (`split.count`); none for a single file.
    pub split_count: Option<u64>,
}

impl ModelInfo {
    /// Bytes of an f16 KV cache for `n_ctx` tokens in total (llama-server splits the context
    /// among its slots, so the total does not grow with the slot count).
    pub fn kv_cache_bytes(&self, n_ctx: u64) -> u64 {
        let (Some(layers), Some(embd)) = (self.block_count, self.embedding_length) else {
            return 0;
        };
        let heads = self.head_count.unwrap_or(1).max(1);
        let kv_heads = self.head_count_kv.unwrap_or(heads);
        let kv_width = (embd / heads).saturating_mul(kv_heads);
        // K and V, f16 (2 bytes each). The numbers come from the file: a crafted header
        // saturates (and then fits no budget) rather than wrapping to a small estimate.
        [layers, n_ctx, kv_width, 2].iter().fold(2u64, |bytes, &factor| bytes.saturating_mul(factor))
    }

    /// How the weights are stored, as llama.cpp names it (`Q4_K_M`, `F16`): from
    /// `general.file_type`, else the tensor type that holds the most bytes.
    pub fn quantization(&self) -> String {
        if let Some(name) = self.details.file_type.and_then(file_type_name) {
            return name.to_string();
        }
        match self.details.dominant_type {
            Some(ggml_type) => type_name(ggml_type).map(str::to_string).unwrap_or_else(|| format!("type {ggml_type}")),
            None => "unknown".to_string(),
        }
    }
}

/// llama.cpp's `llama_ftype` names (llama.h), as `general.file_type` stores them.
fn file_type_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        39 => "NVFP4",
        40 => "Q1_0",
        41 => "Q2_0",
        _ => return None,
    })
}

/// ggml's tensor type names (ggml.h).
fn type_name(ggml_type: u32) -> Option<&'static str> {
    Some(match ggml_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        6 => "Q5_0",
        7 => "Q5_1",
        8 => "Q8_0",
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        12 => "Q4_K",
        13 => "Q5_K",
        14 => "Q6_K",
        15 => "Q8_K",
        16 => "IQ2_XXS",
        17 => "IQ2_XS",
        18 => "IQ3_XXS",
        19 => "IQ1_S",
        20 => "IQ4_NL",
        21 => "IQ3_S",
        22 => "IQ2_S",
        23 => "IQ4_XS",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        29 => "IQ1_M",
        30 => "BF16",
        34 => "TQ1_0",
        35 => "TQ2_0",
        39 => "MXFP4",
        40 => "NVFP4",
        41 => "Q1_0",
        42 => "Q2_0",
        _ => return None,
    })
}

#[derive(Debug)]
enum Value {
    Uint(u64),
    Int(i64),
    Float,
    Bool,
    Str(String),
    Array,
}

/// Parses the header from bytes already read. Running out of bytes is `OutOfData`, so the
/// caller can read more of the file and start again; everything else is a message.
enum ParseError {
    OutOfData,
    Bad(String),
}

impl From<String> for ParseError {
    fn from(message: String) -> Self {
        ParseError::Bad(message)
    }
}

/// Reads the header as a stream through one small reused buffer: a vocabulary is megabytes
/// of strings, and reading it into a fresh allocation costs more in page faults than the
/// parsing itself (measured: 4 ms against 0.5 ms for 4 MiB).
///
/// Every read first asks [`Reader::need`] whether the bytes exist, so nothing is allocated
/// or skipped for a length the file cannot hold, and nothing is read past the size the file
/// had when it was opened or past [`MAX_HEADER_BYTES`].
struct Reader<R> {
    inner: R,
    offset: u64,
    file_size: u64,
}

impl<R: BufRead> Reader<R> {
    fn new(inner: R, file_size: u64) -> Reader<R> {
        Reader { inner, offset: 0, file_size }
    }

    /// Fails unless `n` more bytes may be read: past the end of the file is `OutOfData`
    /// (truncated), past the header bound is a crafted header.
    fn need(&self, n: u64) -> Result<(), ParseError> {
        let end = self.offset.saturating_add(n);
        if end > self.file_size {
            return Err(ParseError::OutOfData);
        }
        if end > MAX_HEADER_BYTES {
            return Err(ParseError::Bad(format!("the header is larger than {} MiB", MAX_HEADER_BYTES >> 20)));
        }
        Ok(())
    }

    /// Bytes of the file after the offset (for a count that claims more than that).
    fn remaining(&self) -> u64 {
        self.file_size.saturating_sub(self.offset)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        self.need(N as u64)?;
        let mut buf = [0u8; N];
        self.inner.read_exact(&mut buf).map_err(|_| ParseError::OutOfData)?;
        self.offset += N as u64;
        Ok(buf)
    }
    fn take(&mut self, n: u64) -> Result<(), ParseError> {
        self.need(n)?;
        let mut left = n;
        while left > 0 {
            let available = self.inner.fill_buf().map_err(|_| ParseError::OutOfData)?.len();
            if available == 0 {
                return Err(ParseError::OutOfData);
            }
            let step = available.min(usize::try_from(left).unwrap_or(usize::MAX));
            self.inner.consume(step);
            left -= step as u64;
        }
        self.offset += n;
        Ok(())
    }
    fn u32(&mut self) -> Result<u32, ParseError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, ParseError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
    /// The length of a string, checked against `max` and against what the file still holds.
    fn string_len(&mut self, max: u64) -> Result<u64, ParseError> {
        let len = self.u64()?;
        if len > max {
            return Err(ParseError::Bad(format!("string of {len} bytes in the header")));
        }
        self.need(len)?;
        Ok(len)
    }
    fn string(&mut self, max: u64) -> Result<String, ParseError> {
        let len = self.string_len(max)?;
        let mut bytes = vec![0u8; len as usize];
        self.inner.read_exact(&mut bytes).map_err(|_| ParseError::OutOfData)?;
        self.offset += len;
        String::from_utf8(bytes).map_err(|_| ParseError::Bad("a header string is not UTF-8".into()))
    }

    /// Skips `count` strings. The strings wholly in the reader's buffer are walked there,
    /// with no call and no copy per string (a vocabulary of 262,144 took 2.5 ms one at a
    /// time); one that crosses the buffer's end is skipped on its own.
    fn skip_strings(&mut self, mut count: u64) -> Result<(), ParseError> {
        while count > 0 {
            let buffer = self.inner.fill_buf().map_err(|_| ParseError::OutOfData)?;
            let mut walked = 0usize;
            while count > 0 {
                let Some(head) = buffer.get(walked..walked + 8) else { break };
                let len = u64::from_le_bytes(head.try_into().expect("eight bytes"));
                if len > MAX_STRING_LEN {
                    return Err(ParseError::Bad(format!("string of {len} bytes in the header")));
                }
                match usize::try_from(len).ok().and_then(|len| (walked + 8).checked_add(len)) {
                    Some(end) if end <= buffer.len() => walked = end,
                    _ => break,
                }
                count -= 1;
            }
            if walked > 0 {
                self.need(walked as u64)?;
                self.inner.consume(walked);
                self.offset += walked as u64;
            } else {
                let len = self.string_len(MAX_STRING_LEN)?;
                self.take(len)?;
                count -= 1;
            }
        }
        Ok(())
    }

    /// One metadata value; `depth` counts the arrays it is inside.
    fn value(&mut self, value_type: u32, depth: u32) -> Result<Value, ParseError> {
        Ok(match value_type {
            0 => Value::Uint(self.array::<1>()?[0] as u64),
            1 => Value::Int(self.array::<1>()?[0] as i8 as i64),
            2 => Value::Uint(u16::from_le_bytes(self.array()?) as u64),
            3 => Value::Int(i16::from_le_bytes(self.array()?) as i64),
            4 => Value::Uint(self.u32()? as u64),
            5 => Value::Int(i32::from_le_bytes(self.array()?) as i64),
            6 => {
                self.array::<4>()?;
                Value::Float
            }
            7 => {
                self.array::<1>()?;
                Value::Bool
            }
            8 => Value::Str(self.string(MAX_STRING_LEN)?),
            9 => {
                if depth >= MAX_NESTING {
                    return Err(ParseError::Bad(format!("metadata arrays nested more than {MAX_NESTING} deep")));
                }
                let element_type = self.u32()?;
                let len = self.u64()?;
                if len > MAX_ARRAY_LEN {
                    return Err(ParseError::Bad(format!("array of {len} elements in the header")));
                }
                let Some(smallest) = smallest_size(element_type) else {
                    return Err(ParseError::Bad(format!("unknown metadata value type {element_type}")));
                };
                // Every element takes at least `smallest` bytes: a count the rest of the file
                // cannot hold is refused before the first element is read.
                if len.saturating_mul(smallest) > self.remaining() {
                    return Err(ParseError::Bad(format!(
                        "the file is truncated or corrupt: an array of {len} elements needs more bytes than \
                         the file holds"
                    )));
                }
                match (fixed_size(element_type), element_type) {
                    (Some(size), _) => {
                        self.take(size.saturating_mul(len))?;
                    }
                    // Vocabularies are arrays of tens of thousands of strings: skip them
                    // without decoding.
                    (None, 8) => self.skip_strings(len)?,
                    (None, _) => {
                        for _ in 0..len {
                            self.value(element_type, depth + 1)?;
                        }
                    }
                }
                Value::Array
            }
            10 => Value::Uint(self.u64()?),
            11 => Value::Int(self.u64()? as i64),
            12 => {
                self.array::<8>()?;
                Value::Float
            }
            other => return Err(ParseError::Bad(format!("unknown metadata value type {other}"))),
        })
    }
}

/// The fewest bytes a value of `value_type` takes: its size, a string's length field, or
/// an array's element type and count.
fn smallest_size(value_type: u32) -> Option<u64> {
    match value_type {
        8 => Some(8),
        9 => Some(12),
        _ => fixed_size(value_type),
    }
}

fn fixed_size(value_type: u32) -> Option<u64> {
    match value_type {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// Elements per block and bytes per block of a ggml tensor type: `blck_size` and
/// `type_size` of ggml's `type_traits` (ggml/src/ggml.c), as `ggml_blck_size` and
/// `ggml_type_size` of build b11434 report them. Ids 4, 5 and 31 to 33, 36 to 38 are types
/// ggml removed; GGUF files cannot hold them.
fn block_layout(ggml_type: u32) -> Option<(u64, u64)> {
    Some(match ggml_type {
        0 => (1, 4),      // F32
        1 => (1, 2),      // F16
        2 => (32, 18),    // Q4_0
        3 => (32, 20),    // Q4_1
        6 => (32, 22),    // Q5_0
        7 => (32, 24),    // Q5_1
        8 => (32, 34),    // Q8_0
        9 => (32, 36),    // Q8_1
        10 => (256, 84),  // Q2_K
        11 => (256, 110), // Q3_K
        12 => (256, 144), // Q4_K
        13 => (256, 176), // Q5_K
        14 => (256, 210), // Q6_K
        15 => (256, 292), // Q8_K
        16 => (256, 66),  // IQ2_XXS
        17 => (256, 74),  // IQ2_XS
        18 => (256, 98),  // IQ3_XXS
        19 => (256, 50),  // IQ1_S
        20 => (32, 18),   // IQ4_NL
        21 => (256, 110), // IQ3_S
        22 => (256, 82),  // IQ2_S
        23 => (256, 136), // IQ4_XS
        24 => (1, 1),     // I8
        25 => (1, 2),     // I16
        26 => (1, 4),     // I32
        27 => (1, 8),     // I64
        28 => (1, 8),     // F64
        29 => (256, 56),  // IQ1_M
        30 => (1, 2),     // BF16
        34 => (256, 54),  // TQ1_0
        35 => (256, 66),  // TQ2_0
        39 => (32, 17),   // MXFP4 (gpt-oss)
        40 => (64, 36),   // NVFP4
        41 => (128, 18),  // Q1_0
        42 => (64, 18),   // Q2_0
        _ => return None,
    })
}

/// Reads the header of `path` and checks that the file holds all the data it describes.
/// The error is a sentence for the user.
pub fn inspect(path: &Path) -> Result<ModelInfo, String> {
    let file = open_regular(path)?;
    let file_size = file.metadata().map_err(|e| format!("cannot stat it: {e}"))?.len();
    let reader = Reader::new(BufReader::with_capacity(1 << 16, file), file_size);
    describe(parse(reader), file_size)
}

/// Reads a header held in memory, with the same checks as [`inspect`] (the fuzz target's
/// way in).
pub fn inspect_bytes(bytes: &[u8]) -> Result<ModelInfo, String> {
    let file_size = bytes.len() as u64;
    describe(parse(Reader::new(bytes, file_size)), file_size)
}

fn describe(parsed: Result<ModelInfo, ParseError>, file_size: u64) -> Result<ModelInfo, String> {
    match parsed {
        Ok(info) => Ok(info),
        Err(ParseError::Bad(message)) => Err(message),
        Err(ParseError::OutOfData) if file_size < 24 => {
            Err("the file is truncated: it is shorter than a GGUF header".to_string())
        }
        Err(ParseError::OutOfData) => Err("the file ends inside its header (truncated)".to_string()),
    }
}

/// Opens `path` for reading only when it is a regular file (a symlink to one is fine).
///
/// The type is checked before the open, because opening a FIFO for reading blocks until a
/// writer comes and opening a device may do something; and again on the open descriptor,
/// so a file swapped for a FIFO between the two is caught too. `O_NONBLOCK` makes that
/// second open return at once even then; on a regular file it changes nothing (Linux
/// ignores it for regular files, see open(2)).
fn open_regular(path: &Path) -> Result<File, String> {
    let metadata = fs::metadata(path).map_err(|e| format!("cannot stat it: {e}"))?;
    refuse_unless_regular(&metadata)?;
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| format!("cannot open it: {e}"))?;
    refuse_unless_regular(&file.metadata().map_err(|e| format!("cannot stat it: {e}"))?)?;
    Ok(file)
}

fn refuse_unless_regular(metadata: &fs::Metadata) -> Result<(), String> {
    let file_type = metadata.file_type();
    let kind = match () {
        _ if file_type.is_file() => return Ok(()),
        _ if file_type.is_dir() => "a directory",
        _ if file_type.is_fifo() => "a FIFO",
        _ if file_type.is_socket() => "a socket",
        _ if file_type.is_char_device() => "a character device",
        _ if file_type.is_block_device() => "a block device",
        _ => "not a regular file",
    };
    Err(format!("it is {kind}, not a model file"))
}

fn parse<R: BufRead>(mut reader: Reader<R>) -> Result<ModelInfo, ParseError> {
    let file_size = reader.file_size;
    let magic: [u8; 4] = reader.array()?;
    if &magic != MAGIC {
        return Err(ParseError::Bad("it does not start with the GGUF magic bytes".to_string()));
    }
    let version = reader.u32()?;
    if !(2..=3).contains(&version) {
        return Err(ParseError::Bad(format!("unsupported GGUF version {version} (llama.cpp reads 2 and 3)")));
    }
    let tensor_count = reader.u64()?;
    let kv_count = reader.u64()?;
    if tensor_count > MAX_COUNT || kv_count > MAX_COUNT {
        return Err(ParseError::Bad(format!("implausible header ({tensor_count} tensors, {kv_count} keys)")));
    }
    // A key takes at least 13 bytes (length, type, one byte of value), a tensor 24 (name
    // length, dimension count, type, offset): counts the file cannot hold are refused now.
    if kv_count * 13 + tensor_count * 24 > reader.remaining() {
        return Err(ParseError::Bad(format!(
            "the file is truncated or corrupt: its header claims {tensor_count} tensors and {kv_count} keys, \
             more than the file holds"
        )));
    }

    let mut metadata: HashMap<String, Value> = HashMap::new();
    for _ in 0..kv_count {
        let key = reader.string(MAX_KEY_LEN)?;
        let value_type = reader.u32()?;
        let value = reader.value(value_type, 0)?;
        metadata.insert(key, value);
    }

    let mut data_end = 0u64;
    let mut parameter_count = 0u64;
    let mut bytes_by_type: HashMap<u32, u64> = HashMap::new();
    let mut has_unknown_type = false;
    for _ in 0..tensor_count {
        let name = reader.string(MAX_KEY_LEN)?;
        let n_dims = reader.u32()?;
        if n_dims > 8 {
            return Err(ParseError::Bad(format!("tensor {name} has {n_dims} dimensions")));
        }
        let mut elements = 1u64;
        for _ in 0..n_dims {
            elements = elements.saturating_mul(reader.u64()?);
        }
        let ggml_type = reader.u32()?;
        let offset = reader.u64()?;
        let size = match block_layout(ggml_type) {
            Some((block, bytes)) => elements.div_ceil(block).saturating_mul(bytes),
            None => {
                has_unknown_type = true;
                0
            }
        };
        parameter_count = parameter_count.saturating_add(elements);
        let type_bytes = bytes_by_type.entry(ggml_type).or_default();
        *type_bytes = type_bytes.saturating_add(size);
        data_end = data_end.max(offset.saturating_add(size));
    }

    let alignment = match metadata.get("general.alignment") {
        Some(Value::Uint(a)) if a.is_power_of_two() && *a <= MAX_ALIGNMENT => *a,
        Some(Value::Uint(a)) => return Err(ParseError::Bad(format!("implausible alignment {a} in the header"))),
        _ => DEFAULT_ALIGNMENT,
    };
    let data_start = reader.offset.div_ceil(alignment).saturating_mul(alignment);
    let needed = data_start.saturating_add(data_end);
    // A type this table does not know (one newer than llama.cpp b11434) has no size; the
    // data on disk is then the best estimate of what the weights take, never zero.
    if has_unknown_type {
        data_end = data_end.max(file_size.saturating_sub(data_start));
    }
    if needed > file_size {
        return Err(ParseError::Bad(format!(
            "the file is truncated: its header describes {needed} bytes but it has {file_size}"
        )));
    }

    let string = |key: &str| match metadata.get(key) {
        Some(Value::Str(s)) => Some(s.clone()),
        _ => None,
    };
    let architecture = string("general.architecture")
        .ok_or_else(|| ParseError::Bad("the header has no general.architecture".to_string()))?;
    let number = |suffix: &str| match metadata.get(&format!("{architecture}.{suffix}")) {
        Some(Value::Uint(n)) => Some(*n),
        Some(Value::Int(n)) if *n >= 0 => Some(*n as u64),
        _ => None,
    };
    let dominant_type = bytes_by_type
        .into_iter()
        .max_by_key(|&(ggml_type, bytes)| (bytes, std::cmp::Reverse(ggml_type)))
        .map(|(t, _)| t);
    let unsigned = |key: &str| match metadata.get(key) {
        Some(Value::Uint(n)) => Some(*n),
        Some(Value::Int(n)) if *n >= 0 => Some(*n as u64),
        _ => None,
    };
    Ok(ModelInfo {
        version,
        details: Box::new(Details {
            parameter_count,
            dominant_type,
            file_type: unsigned("general.file_type"),
            license: string("general.license"),
            author: string("general.author"),
            chat_template: string("tokenizer.chat_template"),
            split_count: unsigned("split.count"),
        }),
        name: string("general.name"),
        context_length: number("context_length"),
        block_count: number("block_count"),
        embedding_length: number("embedding_length"),
        head_count: number("attention.head_count"),
        head_count_kv: number("attention.head_count_kv"),
        has_chat_template: metadata.contains_key("tokenizer.chat_template"),
        pooling_type: number("pooling_type"),
        architecture,
        tensor_count,
        tensor_bytes: data_end,
        file_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn put_string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }

    /// A minimal valid file: one string key, one f32 tensor of 8 elements.
    fn minimal() -> Vec<u8> {
        minimal_with(0, 8)
    }

    /// A minimal file whose one tensor has `elements` of `ggml_type`, with 32 bytes of data.
    fn minimal_with(ggml_type: u32, elements: u64) -> Vec<u8> {
        let mut block_count = Vec::new();
        put_string(&mut block_count, "llama.block_count");
        block_count.extend(4u32.to_le_bytes());
        block_count.extend(2u32.to_le_bytes());
        with_second_key(&block_count, ggml_type, elements)
    }

    /// A minimal file: the architecture, then `key` (name, type and value as bytes), then
    /// one tensor of `elements` of `ggml_type`, with 32 bytes of data.
    fn with_second_key(key: &[u8], ggml_type: u32, elements: u64) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend(1u64.to_le_bytes());
        out.extend(2u64.to_le_bytes());
        put_string(&mut out, "general.architecture");
        out.extend(8u32.to_le_bytes());
        put_string(&mut out, "llama");
        out.extend(key);
        put_string(&mut out, "w");
        out.extend(1u32.to_le_bytes());
        out.extend(elements.to_le_bytes());
        out.extend(ggml_type.to_le_bytes());
        out.extend(0u64.to_le_bytes());
        while out.len() % 32 != 0 {
            out.push(0);
        }
        out.extend([0u8; 32]);
        out
    }

    /// `bytes` written to a file and inspected there, as every caller does.
    fn inspect_file_of(bytes: &[u8]) -> Result<ModelInfo, String> {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(bytes).unwrap();
        inspect(file.path())
    }

    /// A header of `tensor_count` tensors and one key `x` whose value (type and bytes)
    /// follows, as a crafted file would hold it.
    fn with_value(tensor_count: u64, value: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend(b"GGUF");
        out.extend(3u32.to_le_bytes());
        out.extend(tensor_count.to_le_bytes());
        out.extend(1u64.to_le_bytes());
        put_string(&mut out, "x");
        out.extend(value);
        out
    }

    /// An array value: its type, then [`array_element`].
    fn array_head(element_type: u32, len: u64) -> Vec<u8> {
        let mut out = 9u32.to_le_bytes().to_vec();
        out.extend(array_element(element_type, len));
        out
    }

    /// An array as an element of another: element type and count, with no type of its own.
    fn array_element(element_type: u32, len: u64) -> Vec<u8> {
        let mut out = element_type.to_le_bytes().to_vec();
        out.extend(len.to_le_bytes());
        out
    }

    #[test]
    fn reads_a_minimal_file() {
        let info = inspect_file_of(&minimal()).unwrap();
        assert_eq!(info.architecture, "llama");
        assert_eq!(info.block_count, Some(2));
        assert_eq!(info.tensor_bytes, 32);
        assert_eq!(info.details.parameter_count, 8);
        // No general.file_type: the type of the largest tensor names the quantization.
        assert_eq!(info.quantization(), "F32");
        assert_eq!(info.details.chat_template, None);
    }

    #[test]
    fn file_type_names_the_quantization() {
        let with = |file_type, dominant_type| ModelInfo {
            details: Box::new(Details { file_type, dominant_type, ..Details::default() }),
            ..ModelInfo::default()
        };
        let info = with(Some(15), Some(12));
        assert_eq!(info.quantization(), "Q4_K_M");
        let info = with(Some(999), Some(3));
        assert_eq!(info.quantization(), "Q4_1");
        assert_eq!(ModelInfo::default().quantization(), "unknown");
    }

    #[test]
    fn refuses_wrong_magic_and_truncation() {
        let table: [(&[u8], &str); 3] = [
            (b"", "shorter than a GGUF header"),
            (b"PK\x03\x04 not a model at all", "magic"),
            (&minimal()[..40], "truncated"),
        ];
        for (bytes, expected) in table {
            let error = inspect_file_of(bytes).unwrap_err();
            assert!(error.contains(expected), "{error} should mention {expected}");
        }
        let full = minimal();
        let error = inspect_file_of(&full[..full.len() - 1]).unwrap_err();
        assert!(error.contains("truncated"), "{error}");
    }

    #[test]
    fn refuses_absurd_counts() {
        let mut bytes = minimal();
        bytes[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(inspect_file_of(&bytes).unwrap_err().contains("implausible"));
    }

    #[test]
    fn deeply_nested_arrays_are_refused_not_a_stack_overflow() {
        // A million arrays, each holding the next: one recursion per level would take a
        // stack of hundreds of MiB.
        let mut value = 9u32.to_le_bytes().to_vec();
        for _ in 0..1_000_000 {
            value.extend(array_element(9, 1));
        }
        value.extend(array_element(4, 0));
        let error = inspect_bytes(&with_value(0, &value)).unwrap_err();
        assert!(error.contains("nested more than 8 deep"), "{error}");
        // Within the bound, nesting is read (the specification allows it).
        let mut value = 9u32.to_le_bytes().to_vec();
        for _ in 0..7 {
            value.extend(array_element(9, 1));
        }
        value.extend(array_element(4, 1));
        value.extend(7u32.to_le_bytes());
        let mut bytes = with_value(0, &value);
        bytes.resize(bytes.len().next_multiple_of(32), 0);
        let error = inspect_bytes(&bytes).unwrap_err();
        assert!(error.contains("general.architecture"), "read to the end: {error}");
    }

    #[test]
    fn counts_and_lengths_the_file_cannot_hold_are_refused_at_once() {
        let string_value = |len: u64| {
            let mut value = 8u32.to_le_bytes().to_vec();
            value.extend(len.to_le_bytes());
            value
        };
        let table: [(Vec<u8>, &str); 8] = [
            (with_value(0, &array_head(0, u64::MAX)), "array of 18446744073709551615 elements"),
            (with_value(0, &array_head(8, 1 << 24)), "needs more bytes than the file holds"),
            (with_value(0, &array_head(9, 1 << 24)), "needs more bytes than the file holds"),
            (with_value(0, &array_head(12, 1 << 20)), "needs more bytes than the file holds"),
            (with_value(0, &array_head(77, 0)), "unknown metadata value type 77"),
            (with_value(0, &string_value(1 << 40)), "string of 1099511627776 bytes"),
            (with_value(0, &string_value(1 << 20)), "truncated"),
            (with_value(1 << 19, &string_value(0)), "more than the file holds"),
        ];
        for (bytes, expected) in table {
            let started = std::time::Instant::now();
            let error = inspect_bytes(&bytes).unwrap_err();
            assert!(error.contains(expected), "{error} should mention {expected}");
            assert!(started.elapsed() < std::time::Duration::from_secs(1), "{expected}: {:?}", started.elapsed());
        }
        let mut key = minimal();
        key[24..32].copy_from_slice(&(1u64 << 20).to_le_bytes());
        assert!(inspect_bytes(&key).unwrap_err().contains("string of 1048576 bytes"));
    }

    #[test]
    fn a_header_over_128_mib_is_refused() {
        // An array of 2^24 u64 (128 MiB) in a sparse file big enough to hold it.
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(&with_value(0, &array_head(10, 1 << 24))).unwrap();
        file.as_file().set_len(200 << 20).unwrap();
        let error = inspect(file.path()).unwrap_err();
        assert!(error.contains("larger than 128 MiB"), "{error}");
    }

    #[test]
    fn only_regular_files_are_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("x.gguf");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Opening a FIFO for reading blocks until a writer comes: read it on a thread and
        // fail at a deadline rather than hang the test.
        let (sender, answer) = std::sync::mpsc::channel();
        let path = fifo.clone();
        std::thread::spawn(move || {
            let _ = sender.send(inspect(&path));
        });
        let error = answer.recv_timeout(std::time::Duration::from_secs(10)).expect("inspect returned").unwrap_err();
        assert!(error.contains("it is a FIFO, not a model file"), "{error}");
        let error = inspect(dir.path()).unwrap_err();
        assert!(error.contains("a directory"), "{error}");
        let error = inspect(Path::new("/dev/null")).unwrap_err();
        assert!(error.contains("a character device"), "{error}");
        // A symlink to a model is a model.
        let model = dir.path().join("model.gguf");
        fs::write(&model, minimal()).unwrap();
        let link = dir.path().join("link.gguf");
        std::os::unix::fs::symlink(&model, &link).unwrap();
        assert_eq!(inspect(&link).unwrap().architecture, "llama");
        // A descriptor that turns out not to be a regular file is refused after the open too.
        let error = refuse_unless_regular(&fs::metadata(&fifo).unwrap()).unwrap_err();
        assert!(error.contains("FIFO"), "{error}");
    }

    /// `minimal()` with its one tensor of 64 elements stored as `ggml_type`, and room for
    /// its data.
    fn one_tensor_of(ggml_type: u32) -> Vec<u8> {
        let mut bytes = minimal_with(ggml_type, 64);
        bytes.extend([0u8; 256]);
        bytes
    }

    #[test]
    fn mxfp4_and_the_newest_types_have_their_sizes() {
        // 64 elements: two MXFP4 blocks of 32 elements in 17 bytes each.
        let info = inspect_bytes(&one_tensor_of(39)).unwrap();
        assert_eq!(info.tensor_bytes, 34);
        assert_eq!(info.quantization(), "MXFP4");
        for (ggml_type, bytes) in [(40, 36), (41, 18), (42, 18), (12, 144), (2, 36)] {
            assert_eq!(inspect_bytes(&one_tensor_of(ggml_type)).unwrap().tensor_bytes, bytes, "type {ggml_type}");
        }
        // A type newer than the table counts as the bytes on disk after the header.
        let unknown = one_tensor_of(99);
        let info = inspect_bytes(&unknown).unwrap();
        assert!(info.tensor_bytes >= 256, "{}", info.tensor_bytes);
    }

    #[test]
    fn every_named_ggml_type_has_a_size() {
        // ggml.h of b11434 numbers its types 0 to 42 (GGML_TYPE_COUNT = 43); these ids are
        // types it removed.
        let removed = [4, 5, 31, 32, 33, 36, 37, 38];
        for ggml_type in 0..43 {
            let named = type_name(ggml_type).is_some();
            assert_eq!(named, !removed.contains(&ggml_type), "type {ggml_type}");
            assert_eq!(block_layout(ggml_type).is_some(), named, "type {ggml_type}");
        }
        assert_eq!(type_name(43), None);
    }

    /// A small deterministic generator (xorshift64*), so a failing case replays exactly.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// A minimal file with a vocabulary of `words` strings of 0 to 40 bytes before its
    /// tensor.
    fn with_vocabulary(words: usize) -> Vec<u8> {
        let mut vocabulary = Vec::new();
        put_string(&mut vocabulary, "tokenizer.ggml.tokens");
        vocabulary.extend(array_head(8, words as u64));
        for word in 0..words {
            put_string(&mut vocabulary, &"x".repeat(word * 7 % 41));
        }
        with_second_key(&vocabulary, 0, 8)
    }

    /// Parses `bytes` through a reader buffer of `capacity` bytes.
    fn parse_buffered(bytes: &[u8], capacity: usize) -> Result<ModelInfo, String> {
        let reader = Reader::new(std::io::BufReader::with_capacity(capacity, bytes), bytes.len() as u64);
        describe(parse(reader), bytes.len() as u64)
    }

    #[test]
    fn a_vocabulary_reads_the_same_whatever_the_buffer_and_its_faults_are_found() {
        let file = with_vocabulary(1000);
        let whole = inspect_bytes(&file).unwrap();
        assert_eq!(whole.architecture, "llama");
        assert_eq!(whole.tensor_count, 1);
        // Buffers that end inside a length, inside a string and between strings.
        for capacity in [8, 9, 13, 64, 100, 4096] {
            let buffered = parse_buffered(&file, capacity).unwrap();
            assert_eq!((buffered.tensor_count, buffered.tensor_bytes), (whole.tensor_count, whole.tensor_bytes));
        }
        // Cut inside the vocabulary: truncated, at any buffer size.
        let cut = &file[..file.len() / 2];
        for capacity in [8, 13, 4096] {
            assert!(parse_buffered(cut, capacity).unwrap_err().contains("truncated"), "{capacity}");
        }
        // A word claiming more than a string may hold is refused, not skipped.
        let mut huge = with_vocabulary(3);
        let first_word = huge.windows(21).position(|w| w == b"tokenizer.ggml.tokens").unwrap() + 21 + 16;
        huge[first_word..first_word + 8].copy_from_slice(&(MAX_STRING_LEN + 1).to_le_bytes());
        for capacity in [8, 4096] {
            let error = parse_buffered(&huge, capacity).unwrap_err();
            assert!(error.contains("string of"), "{capacity}: {error}");
        }
    }

    #[test]
    fn thousands_of_mutated_headers_never_panic() {
        let original = crate::tiny_model::bytes();
        let header_len = inspect_bytes(&original).map(|info| (info.file_size - info.tensor_bytes) as usize).unwrap();
        // Values that hit the bounds: zero, one, the limits and just past them, all ones.
        let boundaries: [u64; 9] =
            [0, 1, 8, 9, MAX_NESTING as u64 + 1, MAX_ARRAY_LEN + 1, u32::MAX as u64, 1 << 40, u64::MAX];
        let mut random = Random(0x5eed_1234_abcd_9876);
        let mut bytes = original.clone();
        let mut parsed = 0;
        for _ in 0..20_000 {
            let mut changed = Vec::new();
            for _ in 0..1 + random.below(4) {
                let at = random.below(header_len - 8);
                changed.push((at, bytes[at..at + 8].to_vec()));
                match random.below(3) {
                    0 => bytes[at] ^= 1 << random.below(8),
                    1 => bytes[at] = random.next() as u8,
                    _ => {
                        let value = boundaries[random.below(boundaries.len())];
                        bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
                    }
                }
            }
            let end = if random.below(4) == 0 { random.below(bytes.len()) } else { bytes.len() };
            if let Ok(info) = inspect_bytes(&bytes[..end]) {
                assert!(info.tensor_bytes <= info.file_size, "{info:?}");
                parsed += 1;
            }
            for (at, old) in changed.into_iter().rev() {
                bytes[at..at + 8].copy_from_slice(&old);
            }
        }
        assert_eq!(bytes, original);
        assert!(parsed > 100, "the mutations should leave some headers readable: {parsed}");
    }

    #[test]
    fn kv_cache_estimate_uses_kv_heads() {
        let info = ModelInfo {
            block_count: Some(30),
            embedding_length: Some(576),
            head_count: Some(9),
            head_count_kv: Some(3),
            ..ModelInfo::default()
        };
        // 2 (K,V) * 30 layers * 2048 ctx * 192 width * 2 bytes
        assert_eq!(info.kv_cache_bytes(2048), 2 * 30 * 2048 * 192 * 2);
        // A crafted header saturates instead of wrapping to a small estimate.
        let crafted = ModelInfo {
            block_count: Some(u64::MAX / 3),
            embedding_length: Some(u64::MAX / 5),
            head_count: Some(1),
            ..info.clone()
        };
        assert_eq!(crafted.kv_cache_bytes(2048), u64::MAX);
    }
}
