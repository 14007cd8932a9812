//! Reading the tensors of a `torch.save` file (`pytorch_model.bin`) without Python and
//! without running anything the file asks for.
//!
//! Since torch 1.6 such a file is a zip archive: `PREFIX/data.pkl` is a pickle of the
//! state dict, and each tensor storage is an entry of its own, `PREFIX/data/KEY`, stored
//! uncompressed (torch writes every entry with the `stored` method, so a storage's bytes
//! are a contiguous range of the file and can be used straight from a memory map).
//!
//! A pickle is a program for a small stack machine; its `GLOBAL` and `REDUCE` opcodes
//! import and call any Python function, which is how a malicious checkpoint runs code
//! under `torch.load` without `weights_only`. This reader implements the opcodes a state
//! dict needs and resolves a global only when it is one of the few a state dict uses
//! (an `OrderedDict`, the tensor and parameter rebuild functions, the typed storage
//! classes); any other global is refused by its name before anything else is read. It
//! never executes anything: "calling" an allowed global builds a plain Rust value.
//!
//! What is supported, and what is refused with a reason:
//! - tensors that are contiguous views of their storage, at any offset (a storage shared
//!   by several tensors, as tied weights are, is fine); a strided view is refused;
//! - little-endian archives (`PREFIX/byteorder`, where present, must say `little`);
//! - the pickle protocols torch writes (2 by default, 3 to 5 on request);
//! - the pre-1.6 format (a bare pickle stream, not a zip) is refused with how to convert.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io::Cursor;
use std::rc::Rc;

/// One tensor of the state dict, located in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredTensor {
    pub name: String,
    /// torch's storage class without the `Storage` suffix: `Float`, `BFloat16`, `Half`,
    /// `Bool`, `Long`, ...
    pub storage: String,
    pub shape: Vec<usize>,
    /// Absolute byte range of the tensor's data in the file.
    pub start: usize,
    pub end: usize,
}

/// Why a file could not be read as a state dict.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TorchFileError {
    /// The pickle imports a global outside the allowed set (`module.name`).
    #[error(
        "the pickle imports `{0}`, which a state dict never needs; refused without running it"
    )]
    Forbidden(String),
    /// A torch global outside the allowed set: a tensor kind this reader does not read
    /// (quantized, sparse, a subclass, a dtype without a typed storage class).
    #[error("the pickle needs `{0}`, a torch object for tensors other than plain dense ones (quantized, sparse, a tensor subclass, or a dtype such as uint16 or float8); not read, and not run: save a plain state dict of float tensors")]
    UnsupportedTorch(String),
    #[error("saved in torch's legacy format (torch < 1.6, a bare pickle stream); re-save it with a newer torch: torch.save(torch.load(f), f2), or convert the model to safetensors")]
    Legacy,
    #[error("{0}")]
    Bad(String),
}

fn bad(reason: impl Into<String>) -> TorchFileError {
    TorchFileError::Bad(reason.into())
}

/// The storage classes a state dict may name, with their element sizes.
const STORAGES: [(&str, usize); 12] = [
    ("Float", 4),
    ("BFloat16", 2),
    ("Half", 2),
    ("Double", 8),
    ("Long", 8),
    ("Int", 4),
    ("Short", 2),
    ("Char", 1),
    ("Byte", 1),
    ("Bool", 1),
    ("ComplexFloat", 8),
    ("ComplexDouble", 16),
];

/// Element size of a storage class (`Float` -> 4).
pub fn element_size(storage: &str) -> Option<usize> {
    STORAGES
        .iter()
        .find(|(n, _)| *n == storage)
        .map(|&(_, s)| s)
}

/// Reads the state dict of a `torch.save` file held in `bytes` (the whole file, usually
/// a memory map): each tensor's name, storage type, shape and byte range in `bytes`, in
/// the order of the dict.
pub fn read_state_dict(bytes: &[u8]) -> Result<Vec<StoredTensor>, TorchFileError> {
    if !bytes.starts_with(b"PK\x03\x04") {
        return Err(if bytes.first() == Some(&0x80) {
            TorchFileError::Legacy
        } else {
            bad("not a zip archive, so not a file written by torch.save (torch >= 1.6)")
        });
    }
    let mut zip = zip::ZipArchive::new(Cursor::new(bytes))
        .map_err(|e| bad(format!("not a readable zip archive: {e}")))?;
    // Entry name -> (data offset, size), for the stored entries.
    let mut entries: HashMap<String, (u64, u64, bool)> = HashMap::new();
    for i in 0..zip.len() {
        let f = zip
            .by_index_raw(i)
            .map_err(|e| bad(format!("zip entry {i}: {e}")))?;
        let stored = f.compression() == zip::CompressionMethod::Stored;
        entries.insert(f.name().to_owned(), (f.data_start(), f.size(), stored));
    }
    let pkl: Vec<&String> = entries
        .keys()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .collect();
    let [pkl] = pkl[..] else {
        return Err(bad(format!(
            "expected one PREFIX/data.pkl entry, found {}",
            pkl.len()
        )));
    };
    let prefix = pkl.trim_end_matches("data.pkl").to_owned();
    let slice = |name: &str| -> Result<&[u8], TorchFileError> {
        let &(start, size, stored) = entries
            .get(name)
            .ok_or_else(|| bad(format!("the archive has no entry {name}")))?;
        if !stored {
            return Err(bad(format!(
                "entry {name} is compressed; torch.save never compresses, so this file was rewritten by another tool: re-save it with torch.save"
            )));
        }
        let (start, end) = (start as usize, start as usize + size as usize);
        bytes.get(start..end).ok_or_else(|| {
            bad(format!(
                "entry {name} runs past the end of the file (truncated?)"
            ))
        })
    };
    if entries.contains_key(&format!("{prefix}byteorder")) {
        let order = slice(&format!("{prefix}byteorder"))?;
        if order != b"little" {
            return Err(bad(format!(
                "written on a {} machine; only little-endian files are read",
                String::from_utf8_lossy(order)
            )));
        }
    }
    let root = Unpickler::new(slice(pkl)?).run()?;
    let Value::Dict(items) = root else {
        return Err(bad(format!(
            "the pickle holds a {}, not a state dict (a dict of tensors)",
            root.kind()
        )));
    };
    let items = items.borrow();
    let mut out = Vec::with_capacity(items.len());
    for (k, v) in items.iter() {
        let Value::Str(name) = k else {
            return Err(bad(format!(
                "a state dict key is a {}, not a string",
                k.kind()
            )));
        };
        let Value::Tensor(t) = v else {
            return Err(bad(format!(
                "`{name}` is a {}, not a tensor; only state dicts of tensors are read",
                v.kind()
            )));
        };
        let elem = element_size(&t.storage.kind).expect("checked when the storage was loaded");
        let numel: usize = t.shape.iter().product();
        // A contiguous row-major view: its strides are the suffix products of the shape
        // (any stride is fine on a dimension of size 1, and for an empty tensor).
        let mut want = 1usize;
        let contiguous = numel == 0
            || t.shape.iter().zip(&t.stride).rev().all(|(&n, &s)| {
                let ok = n == 1 || s == want;
                want *= n;
                ok
            });
        if !contiguous {
            return Err(bad(format!(
                "`{name}` is a strided view (shape {:?}, stride {:?}) of its storage; only contiguous tensors are read: save tensor.contiguous()",
                t.shape, t.stride
            )));
        }
        if t.offset + numel > t.storage.numel {
            return Err(bad(format!(
                "`{name}` (offset {} + {numel} elements) runs past its storage of {} elements",
                t.offset, t.storage.numel
            )));
        }
        let data = slice(&format!("{prefix}data/{}", t.storage.key))?;
        if data.len() < t.storage.numel * elem {
            return Err(bad(format!(
                "the storage of `{name}` (entry data/{}) holds {} bytes, fewer than its {} elements of {} bytes (truncated?)",
                t.storage.key,
                data.len(),
                t.storage.numel,
                elem
            )));
        }
        let base = data.as_ptr() as usize - bytes.as_ptr() as usize;
        out.push(StoredTensor {
            name: name.clone(),
            storage: t.storage.kind.clone(),
            shape: t.shape.clone(),
            start: base + t.offset * elem,
            end: base + (t.offset + numel) * elem,
        });
    }
    Ok(out)
}

/// A persistent storage reference: `('storage', torch.XStorage, key, location, numel)`.
#[derive(Debug)]
struct Storage {
    kind: String,
    key: String,
    numel: usize,
}

#[derive(Debug)]
struct Tensor {
    storage: Rc<Storage>,
    offset: usize,
    shape: Vec<usize>,
    stride: Vec<usize>,
}

/// The callables a state dict's pickle may name.
#[derive(Clone, Debug)]
enum Global {
    OrderedDict,
    RebuildTensorV2,
    RebuildParameter,
    StorageClass(String),
}

/// A pickle value. The payloads of `Bool`, `Float` and `Bytes` are only ever shown (in
/// error messages, through `Debug`): a state dict needs them as arguments it ignores.
#[derive(Clone, Debug)]
#[allow(dead_code)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Bytes(Vec<u8>),
    Tuple(Rc<Vec<Value>>),
    List(Rc<RefCell<Vec<Value>>>),
    Dict(Rc<RefCell<Vec<(Value, Value)>>>),
    Global(Global),
    Storage(Rc<Storage>),
    Tensor(Rc<Tensor>),
}

impl Value {
    fn kind(&self) -> &'static str {
        match self {
            Value::None => "None",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bytes(_) => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class or function",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    fn usize(&self, what: &str) -> Result<usize, TorchFileError> {
        match self {
            Value::Int(i) if *i >= 0 => Ok(*i as usize),
            v => Err(bad(format!(
                "{what}: expected a non-negative int, got {v:?}"
            ))),
        }
    }

    fn usizes(&self, what: &str) -> Result<Vec<usize>, TorchFileError> {
        match self {
            Value::Tuple(t) => t.iter().map(|v| v.usize(what)).collect(),
            v => Err(bad(format!("{what}: expected a tuple, got a {}", v.kind()))),
        }
    }
}

/// Resolves `module.name` to an allowed global, or refuses it by name.
fn resolve(module: &str, name: &str) -> Result<Global, TorchFileError> {
    match (module, name) {
        ("collections", "OrderedDict") => Ok(Global::OrderedDict),
        ("torch._utils", "_rebuild_tensor_v2") => Ok(Global::RebuildTensorV2),
        ("torch._utils", "_rebuild_parameter") => Ok(Global::RebuildParameter),
        ("torch", n) if n.ends_with("Storage") && element_size(&n[..n.len() - 7]).is_some() => {
            Ok(Global::StorageClass(n[..n.len() - 7].to_owned()))
        }
        ("torch", _) => Err(TorchFileError::UnsupportedTorch(format!("{module}.{name}"))),
        (m, _) if m.starts_with("torch.") => {
            Err(TorchFileError::UnsupportedTorch(format!("{module}.{name}")))
        }
        _ => Err(TorchFileError::Forbidden(format!("{module}.{name}"))),
    }
}

/// The pickle stack machine, restricted to what a state dict needs.
struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    stack: Vec<Value>,
    /// Stack lengths at each MARK.
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8]) -> Self {
        Unpickler {
            data,
            pos: 0,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], TorchFileError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(bad(
                "data.pkl ends in the middle of an instruction (truncated)",
            ));
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, TorchFileError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, TorchFileError> {
        Ok(u16::from_le_bytes(
            self.take(2)?.try_into().expect("2 bytes"),
        ))
    }

    fn u32(&mut self) -> Result<u32, TorchFileError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }

    fn u64(&mut self) -> Result<u64, TorchFileError> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }

    fn line(&mut self) -> Result<String, TorchFileError> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| bad("data.pkl: a GLOBAL name has no end"))?;
        let s = String::from_utf8(rest[..n].to_vec())
            .map_err(|_| bad("data.pkl: a GLOBAL name is not UTF-8"))?;
        self.pos += n + 1;
        Ok(s)
    }

    fn string(&mut self, n: usize) -> Result<Value, TorchFileError> {
        let b = self.take(n)?;
        String::from_utf8(b.to_vec())
            .map(Value::Str)
            .map_err(|_| bad("data.pkl: a string is not UTF-8"))
    }

    fn pop(&mut self) -> Result<Value, TorchFileError> {
        if self.marks.last().is_some_and(|&m| m >= self.stack.len()) {
            return Err(bad("data.pkl: an instruction pops past a MARK"));
        }
        self.stack
            .pop()
            .ok_or_else(|| bad("data.pkl: an instruction pops an empty stack"))
    }

    fn top(&mut self) -> Result<&mut Value, TorchFileError> {
        self.stack
            .last_mut()
            .ok_or_else(|| bad("data.pkl: an instruction needs a value on an empty stack"))
    }

    /// Everything pushed since the last MARK, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Value>, TorchFileError> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| bad("data.pkl: an instruction needs a MARK that is not there"))?;
        Ok(self.stack.split_off(m))
    }

    fn memo_put(&mut self, key: u32) -> Result<(), TorchFileError> {
        let v = self.top()?.clone();
        self.memo.insert(key, v);
        Ok(())
    }

    fn memo_get(&mut self, key: u32) -> Result<(), TorchFileError> {
        let v = self.memo.get(&key).cloned().ok_or_else(|| {
            bad(format!(
                "data.pkl: memo entry {key} is read before it is set"
            ))
        })?;
        self.stack.push(v);
        Ok(())
    }

    fn run(mut self) -> Result<Value, TorchFileError> {
        loop {
            let at = self.pos;
            let op = self.u8()?;
            match op {
                0x80 => {
                    let proto = self.u8()?; // PROTO
                    if proto > 5 {
                        return Err(bad(format!("data.pkl: pickle protocol {proto} is unknown")));
                    }
                }
                0x95 => {
                    self.u64()?; // FRAME: a length hint only
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'}' => self.stack.push(Value::Dict(Rc::default())),
                b']' => self.stack.push(Value::List(Rc::default())),
                b')' => self.stack.push(Value::Tuple(Rc::default())),
                b't' => {
                    let items = self.pop_mark()?;
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize; // TUPLE1, TUPLE2, TUPLE3
                    let mut items = Vec::with_capacity(n);
                    for _ in 0..n {
                        items.push(self.pop()?);
                    }
                    items.reverse();
                    self.stack.push(Value::Tuple(Rc::new(items)));
                }
                b'q' => {
                    let k = self.u8()? as u32; // BINPUT
                    self.memo_put(k)?;
                }
                b'r' => {
                    let k = self.u32()?; // LONG_BINPUT
                    self.memo_put(k)?;
                }
                0x94 => {
                    let k = self.memo.len() as u32; // MEMOIZE
                    self.memo_put(k)?;
                }
                b'h' => {
                    let k = self.u8()? as u32; // BINGET
                    self.memo_get(k)?;
                }
                b'j' => {
                    let k = self.u32()?; // LONG_BINGET
                    self.memo_get(k)?;
                }
                b'J' => {
                    let v = i32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"));
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.u8()?;
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = self.u16()?;
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a => {
                    // LONG1: little-endian two's complement of n bytes.
                    let n = self.u8()? as usize;
                    let b = self.take(n)?;
                    if n > 8 {
                        return Err(bad("data.pkl: an integer wider than 64 bits"));
                    }
                    let mut buf = if b.last().is_some_and(|&x| x & 0x80 != 0) {
                        [0xFF; 8]
                    } else {
                        [0; 8]
                    };
                    buf[..n].copy_from_slice(b);
                    self.stack.push(Value::Int(i64::from_le_bytes(buf)));
                }
                b'G' => {
                    let v = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                    self.stack.push(Value::Float(v));
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool(true)),
                0x89 => self.stack.push(Value::Bool(false)),
                b'X' => {
                    let n = self.u32()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                0x8c => {
                    let n = self.u8()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                0x8d => {
                    let n = self.u64()? as usize;
                    let s = self.string(n)?;
                    self.stack.push(s);
                }
                b'C' => {
                    let n = self.u8()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'B' => {
                    let n = self.u32()? as usize;
                    let b = self.take(n)?.to_vec();
                    self.stack.push(Value::Bytes(b));
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    self.stack.push(Value::Global(resolve(&module, &name)?));
                }
                0x93 => {
                    // STACK_GLOBAL
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(bad("data.pkl: STACK_GLOBAL of values that are not strings"));
                    };
                    self.stack.push(Value::Global(resolve(&module, &name)?));
                }
                b'R' => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let v = reduce(f, args)?;
                    self.stack.push(v);
                }
                b'Q' => {
                    let pid = self.pop()?;
                    self.stack.push(persistent_load(pid)?);
                }
                b'b' => {
                    // BUILD: the state of an object; a state dict's OrderedDict carries
                    // its `_metadata` (module versions) this way, which is not needed.
                    let _state = self.pop()?;
                    if !matches!(self.top()?, Value::Dict(_)) {
                        return Err(bad("data.pkl: BUILD on something other than a dict"));
                    }
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    match self.top()? {
                        Value::Dict(d) => d.borrow_mut().push((k, v)),
                        _ => return Err(bad("data.pkl: SETITEM on something other than a dict")),
                    }
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(bad("data.pkl: SETITEMS with an odd number of values"));
                    }
                    match self.top()? {
                        Value::Dict(d) => {
                            let mut d = d.borrow_mut();
                            let mut it = items.into_iter();
                            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                                d.push((k, v));
                            }
                        }
                        _ => return Err(bad("data.pkl: SETITEMS on something other than a dict")),
                    }
                }
                b'a' => {
                    let v = self.pop()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().push(v),
                        _ => return Err(bad("data.pkl: APPEND to something other than a list")),
                    }
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    match self.top()? {
                        Value::List(l) => l.borrow_mut().extend(items),
                        _ => return Err(bad("data.pkl: APPENDS to something other than a list")),
                    }
                }
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                _ => {
                    return Err(bad(format!(
                        "data.pkl: pickle instruction 0x{op:02x} at byte {at} is not one a state dict uses"
                    )))
                }
            }
        }
    }
}

/// `f(*args)` for the allowed callables.
fn reduce(f: Value, args: Value) -> Result<Value, TorchFileError> {
    let Value::Tuple(args) = args else {
        return Err(bad("data.pkl: REDUCE with arguments that are not a tuple"));
    };
    let Value::Global(g) = f else {
        return Err(bad(format!("data.pkl: REDUCE calls a {}", f.kind())));
    };
    match g {
        Global::OrderedDict if args.is_empty() => Ok(Value::Dict(Rc::default())),
        Global::RebuildTensorV2 if (6..=7).contains(&args.len()) => {
            // (storage, storage_offset, size, stride, requires_grad, backward_hooks[, metadata])
            let Value::Storage(storage) = &args[0] else {
                return Err(bad("data.pkl: a tensor whose storage is not a storage"));
            };
            let shape = args[2].usizes("tensor size")?;
            let stride = args[3].usizes("tensor stride")?;
            if shape.len() != stride.len() {
                return Err(bad("data.pkl: a tensor's size and stride differ in length"));
            }
            Ok(Value::Tensor(Rc::new(Tensor {
                storage: storage.clone(),
                offset: args[1].usize("storage offset")?,
                shape,
                stride,
            })))
        }
        // (data, requires_grad, backward_hooks): an nn.Parameter is its tensor here.
        Global::RebuildParameter if args.len() == 3 => match &args[0] {
            t @ Value::Tensor(_) => Ok(t.clone()),
            v => Err(bad(format!("data.pkl: a parameter of a {}", v.kind()))),
        },
        g => Err(bad(format!(
            "data.pkl: {g:?} called with {} arguments",
            args.len()
        ))),
    }
}

/// `('storage', torch.XStorage, key, location, numel)` -> a storage reference.
fn persistent_load(pid: Value) -> Result<Value, TorchFileError> {
    let Value::Tuple(t) = &pid else {
        return Err(bad(format!(
            "data.pkl: a persistent id is a {}, not a tuple",
            pid.kind()
        )));
    };
    match &t[..] {
        [Value::Str(tag), Value::Global(Global::StorageClass(kind)), Value::Str(key), _location, numel]
            if tag == "storage" =>
        {
            Ok(Value::Storage(Rc::new(Storage {
                kind: kind.clone(),
                key: key.clone(),
                numel: numel.usize("storage size")?,
            })))
        }
        _ => Err(bad(
            "data.pkl: a persistent id that is not ('storage', torch.XStorage, key, location, size)",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// (name, storage class, shape, stride, storage elements)
    type Spec<'a> = (&'a str, &'a str, &'a [usize], &'a [usize], usize);

    /// A minimal protocol-2 pickle of `OrderedDict(name -> tensor)`, as torch writes it,
    /// each tensor its own storage.
    fn pickle(tensors: &[Spec]) -> Vec<u8> {
        let mut p = vec![0x80, 2];
        p.extend(b"ccollections\nOrderedDict\nq\x00)Rq\x01(");
        for (i, (name, kind, shape, stride, numel)) in tensors.iter().enumerate() {
            p.push(b'X');
            p.extend((name.len() as u32).to_le_bytes());
            p.extend(name.as_bytes());
            p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(");
            // persistent id
            p.extend(b"(X\x07\x00\x00\x00storage");
            p.extend(format!("ctorch\n{kind}Storage\n").as_bytes());
            let key = i.to_string();
            p.push(b'X');
            p.extend((key.len() as u32).to_le_bytes());
            p.extend(key.as_bytes());
            p.extend(b"X\x03\x00\x00\x00cpu");
            p.push(b'J');
            p.extend((*numel as i32).to_le_bytes());
            p.extend(b"tQ");
            p.extend(b"K\x00"); // offset
            for dims in [shape, stride] {
                p.push(b'(');
                for d in dims.iter() {
                    p.push(b'J');
                    p.extend((*d as i32).to_le_bytes());
                }
                p.push(b't');
            }
            p.extend(b"\x89ccollections\nOrderedDict\n)R");
            p.extend(b"tR");
        }
        p.extend(b"u.");
        p
    }

    fn archive(pkl: &[u8], storages: &[Vec<u8>]) -> Vec<u8> {
        use std::io::Write;
        let mut w = zip::ZipWriter::new(Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        w.start_file("archive/data.pkl", opts).unwrap();
        w.write_all(pkl).unwrap();
        w.start_file("archive/byteorder", opts).unwrap();
        w.write_all(b"little").unwrap();
        for (i, s) in storages.iter().enumerate() {
            w.start_file(format!("archive/data/{i}"), opts).unwrap();
            w.write_all(s).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn a_state_dict_reads_with_its_byte_ranges() {
        let a: Vec<u8> = (0..24).collect();
        let b: Vec<u8> = (100..104).collect();
        let file = archive(
            &pickle(&[
                ("w", "Float", &[2, 3], &[3, 1], 6),
                ("b", "BFloat16", &[2], &[1], 2),
            ]),
            &[a.clone(), b.clone()],
        );
        let ts = read_state_dict(&file).unwrap();
        assert_eq!(ts.len(), 2);
        assert_eq!(
            (ts[0].name.as_str(), ts[0].storage.as_str()),
            ("w", "Float")
        );
        assert_eq!(ts[0].shape, vec![2, 3]);
        assert_eq!(&file[ts[0].start..ts[0].end], &a[..]);
        assert_eq!(&file[ts[1].start..ts[1].end], &b[..]);
    }

    #[test]
    fn strided_views_and_short_storages_are_refused_by_name() {
        let file = archive(
            &pickle(&[("t", "Float", &[2, 3], &[1, 2], 6)]),
            &[vec![0; 24]],
        );
        let e = read_state_dict(&file).unwrap_err().to_string();
        assert!(e.contains("`t` is a strided view"), "{e}");
        let file = archive(
            &pickle(&[("t", "Float", &[2, 3], &[3, 1], 8)]),
            &[vec![0; 24]],
        );
        let e = read_state_dict(&file).unwrap_err().to_string();
        assert!(
            e.contains("storage of `t`") && e.contains("truncated"),
            "{e}"
        );
    }

    #[test]
    fn a_forbidden_global_is_refused_by_name_and_never_called() {
        // The classic payload: os.system("...") through GLOBAL + REDUCE.
        let pkl = b"\x80\x02cos\nsystem\nX\x05\x00\x00\x00touch\x85R.";
        let e = read_state_dict(&archive(pkl, &[])).unwrap_err();
        assert_eq!(e, TorchFileError::Forbidden("os.system".into()));
        // The same through protocol 4's STACK_GLOBAL.
        let pkl = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93X\x01\x00\x00\x001\x85R.";
        let e = read_state_dict(&archive(pkl, &[])).unwrap_err();
        assert_eq!(e, TorchFileError::Forbidden("builtins.eval".into()));
        // A torch function outside the set is not called either, and named as such.
        let pkl = b"\x80\x02ctorch._utils\n_rebuild_qtensor\n)R.";
        let e = read_state_dict(&archive(pkl, &[])).unwrap_err();
        assert_eq!(
            e,
            TorchFileError::UnsupportedTorch("torch._utils._rebuild_qtensor".into())
        );
    }

    #[test]
    fn the_legacy_format_and_other_files_are_named() {
        let legacy = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.";
        assert_eq!(read_state_dict(legacy).unwrap_err(), TorchFileError::Legacy);
        let e = read_state_dict(b"{\"not\": \"torch\"}")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a zip archive"), "{e}");
        // A truncated pickle.
        let e = read_state_dict(&archive(b"\x80\x02ccollections\nOrd", &[]))
            .unwrap_err()
            .to_string();
        assert!(e.contains("data.pkl"), "{e}");
    }
}
