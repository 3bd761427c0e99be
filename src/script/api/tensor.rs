//! The `Tensor` script type: a cheap handle on a candle tensor, with operators, shape,
//! slicing, reductions, elementwise maths and conversion to and from rhai arrays.

use std::rc::Rc;

use candle_core::{DType, Device, Tensor};
use rand::Rng;
use rhai::{Array, Dynamic, EvalAltResult};

use crate::script::engine::{script_err, HostContext};
use crate::script::registry::Api;

/// A candle tensor as a rhai value; cloning it shares the storage (no copy).
#[derive(Clone, Debug)]
pub struct TensorHandle(pub Tensor);

type RResult<T> = std::result::Result<T, Box<EvalAltResult>>;

fn rt<T>(r: candle_core::Result<T>) -> RResult<T> {
    r.map_err(script_err)
}

/// A rhai array of integers as a shape.
pub fn array_to_dims(shape: &Array) -> RResult<Vec<usize>> {
    shape
        .iter()
        .map(|d| {
            d.as_int()
                .ok()
                .and_then(|i| usize::try_from(i).ok())
                .ok_or_else(|| script_err(format!("a shape holds non-negative integers, got {d}")))
        })
        .collect()
}

fn dims_to_array(dims: &[usize]) -> Array {
    dims.iter().map(|&d| Dynamic::from_int(d as i64)).collect()
}

/// Reads a number (int or float) from a rhai value.
pub fn as_f64(v: &Dynamic) -> Option<f64> {
    v.as_float()
        .ok()
        .or_else(|| v.as_int().ok().map(|i| i as f64))
}

/// Parses a dtype name: f32, f16, bf16, f64, u32, i64, u8.
pub fn parse_dtype(name: &str) -> RResult<DType> {
    match name {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        "f64" => Ok(DType::F64),
        "u32" => Ok(DType::U32),
        "i64" => Ok(DType::I64),
        "u8" => Ok(DType::U8),
        other => Err(script_err(format!(
            "unknown dtype `{other}`; known: f32, f16, bf16, f64, u32, i64, u8"
        ))),
    }
}

fn flatten(
    value: &Dynamic,
    depth: usize,
    dims: &mut Vec<usize>,
    out: &mut Vec<f64>,
) -> RResult<()> {
    if let Some(items) = value.read_lock::<Array>() {
        if dims.len() == depth {
            dims.push(items.len());
        } else if dims[depth] != items.len() {
            return Err(script_err(format!(
                "ragged array: length {} at depth {depth} where {} was expected",
                items.len(),
                dims[depth]
            )));
        }
        for item in items.iter() {
            flatten(item, depth + 1, dims, out)?;
        }
        return Ok(());
    }

    if depth != dims.len() {
        return Err(script_err(format!(
            "ragged array: a number at depth {depth}"
        )));
    }
    let x = as_f64(value).ok_or_else(|| {
        script_err(format!(
            "a tensor holds numbers, got {} ({value})",
            value.type_name()
        ))
    })?;
    out.push(x);
    Ok(())
}

/// A tensor of `dtype` from a (nested) rhai array of numbers.
pub fn array_to_tensor(array: &Array, dtype: DType, device: &Device) -> RResult<Tensor> {
    let mut dims = Vec::new();
    let mut values = Vec::new();
    flatten(
        &Dynamic::from_array(array.clone()),
        0,
        &mut dims,
        &mut values,
    )?;
    let t = rt(Tensor::from_vec(values, dims, device))?;
    rt(t.to_dtype(dtype))
}

/// A (nested) rhai array of the tensor's values: integers for integer dtypes, floats otherwise.
pub fn tensor_to_array(t: &Tensor) -> RResult<Dynamic> {
    let is_int = matches!(t.dtype(), DType::U8 | DType::U32 | DType::I64);
    let flat = rt(rt(t.to_dtype(DType::F64))?.flatten_all())?;
    let values = rt(flat.to_vec1::<f64>())?;
    let to_dyn = |x: f64| {
        if is_int {
            Dynamic::from_int(x as i64)
        } else {
            Dynamic::from_float(x)
        }
    };
    if t.rank() == 0 {
        return Ok(to_dyn(values[0]));
    }

    fn build(values: &[f64], dims: &[usize], to_dyn: &dyn Fn(f64) -> Dynamic) -> Dynamic {
        if dims.len() == 1 {
            return Dynamic::from_array(values.iter().map(|&x| to_dyn(x)).collect());
        }
        let stride: usize = dims[1..].iter().product();
        let rows = (0..dims[0])
            .map(|i| build(&values[i * stride..(i + 1) * stride], &dims[1..], to_dyn))
            .collect();
        Dynamic::from_array(rows)
    }
    Ok(build(&values, t.dims(), &to_dyn))
}

fn dim(t: &Tensor, d: i64) -> RResult<usize> {
    let rank = t.rank() as i64;
    let resolved = if d < 0 { rank + d } else { d };
    if resolved < 0 || resolved >= rank {
        return Err(script_err(format!(
            "dimension {d} out of range for a tensor of shape {:?}",
            t.dims()
        )));
    }
    Ok(resolved as usize)
}

fn scalar_like(t: &Tensor, x: f64) -> RResult<Tensor> {
    rt(rt(Tensor::new(x, t.device()))?.to_dtype(t.dtype()))
}

fn binary(a: &Tensor, b: &Tensor, op: &str) -> RResult<TensorHandle> {
    let r = match op {
        "+" => a.broadcast_add(b),
        "-" => a.broadcast_sub(b),
        "*" => a.broadcast_mul(b),
        "/" => a.broadcast_div(b),
        _ => a.broadcast_pow(b),
    };
    r.map(TensorHandle).map_err(|e| {
        script_err(format!(
            "`{op}` on shapes {:?} and {:?}: {e}",
            a.dims(),
            b.dims()
        ))
    })
}

/// Numerically stable softplus, log(1 + e^x), from differentiable ops.
pub fn softplus(x: &Tensor) -> candle_core::Result<Tensor> {
    x.relu()?
        .add(&x.abs()?.neg()?.exp()?.affine(1.0, 1.0)?.log()?)
}

/// Sigmoid from differentiable ops: 1 / (1 + e^-x).
pub fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    x.neg()?.exp()?.affine(1.0, 1.0)?.recip()
}

/// Registers the `Tensor` type and its functions.
pub fn register(api: &mut Api, ctx: &Rc<HostContext>) {
    api.engine()
        .register_type_with_name::<TensorHandle>("Tensor");
    api.category("tensor");

    let device = ctx.options.device.clone();
    let d = device.clone();
    api.func(
        "tensor",
        "tensor(array) -> Tensor; tensor(array, dtype) -> Tensor",
        "A tensor from a (nested) array of numbers, f32 unless a dtype is given.",
        "let t = tensor([[1.0, 2.0], [3.0, 4.0]]);\nlet ids = tensor([1, 2, 3], \"u32\");",
        move |a: Array| -> RResult<TensorHandle> {
            array_to_tensor(&a, DType::F32, &d).map(TensorHandle)
        },
    );
    let d = device.clone();
    api.overload(
        "tensor",
        move |a: Array, dtype: &str| -> RResult<TensorHandle> {
            array_to_tensor(&a, parse_dtype(dtype)?, &d).map(TensorHandle)
        },
    );
    let d = device.clone();
    api.func(
        "zeros",
        "zeros(shape) -> Tensor",
        "An f32 tensor of zeros.",
        "let z = zeros([2, 3]);",
        move |s: Array| -> RResult<TensorHandle> {
            rt(Tensor::zeros(array_to_dims(&s)?, DType::F32, &d)).map(TensorHandle)
        },
    );
    let d = device.clone();
    api.func(
        "ones",
        "ones(shape) -> Tensor",
        "An f32 tensor of ones.",
        "let o = ones([4]);",
        move |s: Array| -> RResult<TensorHandle> {
            rt(Tensor::ones(array_to_dims(&s)?, DType::F32, &d)).map(TensorHandle)
        },
    );
    let d = device.clone();
    api.func(
        "full",
        "full(shape, value) -> Tensor",
        "An f32 tensor filled with one value.",
        "let h = full([2, 2], 0.5);",
        move |s: Array, v: f64| -> RResult<TensorHandle> {
            let t = rt(Tensor::full(v as f32, array_to_dims(&s)?, &d))?;
            Ok(TensorHandle(t))
        },
    );
    let d = device.clone();
    api.func(
        "arange",
        "arange(start, end) -> Tensor",
        "The integers start..end as an f32 tensor.",
        "let r = arange(0, 5); // [0, 1, 2, 3, 4]",
        move |a: i64, b: i64| -> RResult<TensorHandle> {
            let t = rt(Tensor::arange(a as f32, b as f32, &d))?;
            Ok(TensorHandle(t))
        },
    );
    let (d, c) = (device.clone(), ctx.clone());
    api.func(
        "randn",
        "randn(shape) -> Tensor",
        "Standard normal f32 values from the host's seeded generator (--seed).",
        "let noise = randn([8, 16]);",
        move |s: Array| -> RResult<TensorHandle> {
            let dims = array_to_dims(&s)?;
            let n: usize = dims.iter().product();
            let mut rng = c.rng.borrow_mut();
            let values: Vec<f32> = (0..n)
                .map(|_| {
                    // Box-Muller: two uniforms in (0, 1] give one standard normal.
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random::<f64>();
                    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                })
                .collect();
            rt(Tensor::from_vec(values, dims, &d)).map(TensorHandle)
        },
    );

    api.doc(
        "+",
        "a + b",
        "Elementwise sum with broadcasting; either side may be a number.",
        "let y = t + 1.0;\nlet z = t + t;",
    );
    api.doc(
        "-",
        "a - b; -a",
        "Elementwise difference with broadcasting, or negation.",
        "let y = 1.0 - t;\nlet n = -t;",
    );
    api.doc(
        "*",
        "a * b",
        "Elementwise product with broadcasting; either side may be a number.",
        "let y = t * 2.0;",
    );
    api.doc(
        "/",
        "a / b",
        "Elementwise quotient with broadcasting; either side may be a number.",
        "let y = t / t.sum();",
    );
    api.doc(
        "**",
        "a ** b",
        "Elementwise power with broadcasting.",
        "let sq = t ** 2.0;",
    );
    for op in ["+", "-", "*", "/", "**"] {
        api.overload(op, move |a: TensorHandle, b: TensorHandle| {
            binary(&a.0, &b.0, op)
        });
        api.overload(op, move |a: TensorHandle, b: f64| {
            binary(&a.0, &scalar_like(&a.0, b)?, op)
        });
        api.overload(op, move |a: TensorHandle, b: i64| {
            binary(&a.0, &scalar_like(&a.0, b as f64)?, op)
        });
        api.overload(op, move |a: f64, b: TensorHandle| {
            binary(&scalar_like(&b.0, a)?, &b.0, op)
        });
        api.overload(op, move |a: i64, b: TensorHandle| {
            binary(&scalar_like(&b.0, a as f64)?, &b.0, op)
        });
    }
    api.overload("-", |a: TensorHandle| rt(a.0.neg()).map(TensorHandle));

    api.engine()
        .register_get("shape", |t: &mut TensorHandle| dims_to_array(t.0.dims()));
    api.doc(
        "shape",
        "t.shape -> array",
        "The dimensions, as an array of integers.",
        "print(t.shape); // [2, 3]",
    );
    api.engine()
        .register_get("rank", |t: &mut TensorHandle| t.0.rank() as i64);
    api.doc(
        "rank",
        "t.rank -> int",
        "The number of dimensions.",
        "print(t.rank);",
    );
    api.engine().register_get("dtype", |t: &mut TensorHandle| {
        format!("{:?}", t.0.dtype()).to_lowercase()
    });
    api.doc(
        "dtype",
        "t.dtype -> string",
        "The element type (f32, bf16, u32, ...).",
        "print(t.dtype);",
    );
    api.engine().register_get("device", |t: &mut TensorHandle| {
        format!("{:?}", t.0.device())
    });
    api.doc(
        "device",
        "t.device -> string",
        "The device the tensor lives on.",
        "print(t.device);",
    );
    api.func(
        "numel",
        "t.numel() -> int",
        "The number of elements.",
        "print(t.numel());",
        |t: TensorHandle| t.0.elem_count() as i64,
    );

    api.engine()
        .register_indexer_get(|t: &mut TensorHandle, i: i64| -> RResult<TensorHandle> {
            let n = t.0.dims().first().copied().unwrap_or(0) as i64;
            let idx = if i < 0 { n + i } else { i };
            if idx < 0 || idx >= n {
                return Err(script_err(format!(
                    "index {i} out of range for shape {:?}",
                    t.0.dims()
                )));
            }
            rt(t.0.get(idx as usize)).map(TensorHandle)
        });
    api.doc(
        "[]",
        "t[i] -> Tensor",
        "Row i along the first dimension (negative counts from the end).",
        "let first = t[0];\nlet last = t[-1];",
    );
    api.func(
        "narrow",
        "t.narrow(dim, start, len) -> Tensor",
        "A view of `len` entries from `start` along `dim`.",
        "let head = t.narrow(1, 0, 2);",
        |t: TensorHandle, d: i64, start: i64, len: i64| -> RResult<TensorHandle> {
            let d = dim(&t.0, d)?;
            rt(t.0.narrow(d, start.max(0) as usize, len.max(0) as usize)).map(TensorHandle)
        },
    );
    api.func(
        "slice",
        "t.slice(dim, start, end) -> Tensor",
        "Entries start..end along dim (end exclusive; negative values count from the end).",
        "let tail = t.slice(0, -2, t.shape[0]);",
        |t: TensorHandle, d: i64, start: i64, end: i64| -> RResult<TensorHandle> {
            let d = dim(&t.0, d)?;
            let n = t.0.dims()[d] as i64;
            let fix = |x: i64| if x < 0 { (n + x).max(0) } else { x.min(n) };
            let (s, e) = (fix(start), fix(end));
            rt(t.0.narrow(d, s as usize, (e - s).max(0) as usize)).map(TensorHandle)
        },
    );
    api.func(
        "select",
        "t.select(dim, i) -> Tensor",
        "Entry i along dim, removing that dimension.",
        "let col = t.select(1, 0);",
        |t: TensorHandle, d: i64, i: i64| -> RResult<TensorHandle> {
            let d = dim(&t.0, d)?;
            rt(t.0
                .narrow(d, i.max(0) as usize, 1)
                .and_then(|x| x.squeeze(d)))
            .map(TensorHandle)
        },
    );
    api.func(
        "reshape",
        "t.reshape(shape) -> Tensor",
        "The same values with a new shape of equal size.",
        "let flat = t.reshape([6]);",
        |t: TensorHandle, s: Array| -> RResult<TensorHandle> {
            let dims = array_to_dims(&s)?;
            t.0.reshape(dims.clone()).map(TensorHandle).map_err(|e| {
                script_err(format!(
                    "reshape of shape {:?} to {dims:?}: {e}",
                    t.0.dims()
                ))
            })
        },
    );
    api.func(
        "transpose",
        "t.transpose(d1, d2) -> Tensor",
        "Swaps two dimensions.",
        "let tt = t.transpose(0, 1);",
        |t: TensorHandle, a: i64, b: i64| -> RResult<TensorHandle> {
            let (a, b) = (dim(&t.0, a)?, dim(&t.0, b)?);
            rt(t.0.transpose(a, b)).map(TensorHandle)
        },
    );
    api.func(
        "unsqueeze",
        "t.unsqueeze(dim) -> Tensor",
        "Inserts a dimension of size 1.",
        "let row = t.unsqueeze(0);",
        |t: TensorHandle, d: i64| -> RResult<TensorHandle> {
            let d = if d < 0 {
                (t.0.rank() as i64 + 1 + d).max(0) as usize
            } else {
                d as usize
            };
            rt(t.0.unsqueeze(d)).map(TensorHandle)
        },
    );
    api.func(
        "squeeze",
        "t.squeeze(dim) -> Tensor",
        "Removes a dimension of size 1.",
        "let v = t.squeeze(0);",
        |t: TensorHandle, d: i64| -> RResult<TensorHandle> {
            let d = dim(&t.0, d)?;
            rt(t.0.squeeze(d)).map(TensorHandle)
        },
    );
    api.func(
        "cat",
        "cat(tensors, dim) -> Tensor",
        "Concatenates an array of tensors along dim.",
        "let both = cat([a, b], 0);",
        |ts: Array, d: i64| -> RResult<TensorHandle> {
            let ts = tensors_of(&ts)?;
            let d = dim(
                ts.first().ok_or_else(|| script_err("cat of no tensors"))?,
                d,
            )?;
            rt(Tensor::cat(&ts, d)).map(TensorHandle)
        },
    );
    api.func(
        "stack",
        "stack(tensors, dim) -> Tensor",
        "Stacks an array of equal-shape tensors along a new dimension.",
        "let m = stack([a, b], 0);",
        |ts: Array, d: i64| -> RResult<TensorHandle> {
            let ts = tensors_of(&ts)?;
            rt(Tensor::stack(&ts, d.max(0) as usize)).map(TensorHandle)
        },
    );
    api.func(
        "matmul",
        "a.matmul(b) -> Tensor",
        "Matrix product, batched over leading dimensions.",
        "let y = x.matmul(w.transpose(0, 1));",
        |a: TensorHandle, b: TensorHandle| -> RResult<TensorHandle> {
            a.0.broadcast_matmul(&b.0).map(TensorHandle).map_err(|e| {
                script_err(format!(
                    "matmul of {:?} and {:?}: {e}",
                    a.0.dims(),
                    b.0.dims()
                ))
            })
        },
    );

    register_reductions(api);
    register_elementwise(api);

    api.func(
        "item",
        "t.item() -> f64",
        "The value of a one-element tensor.",
        "let loss = (t * t).mean().item();",
        |t: TensorHandle| -> RResult<f64> {
            if t.0.elem_count() != 1 {
                return Err(script_err(format!(
                    "item() needs a one-element tensor, got shape {:?}",
                    t.0.dims()
                )));
            }
            let v = rt(rt(t.0.to_dtype(DType::F64))?.flatten_all())?;
            rt(v.to_vec1::<f64>()).map(|v| v[0])
        },
    );
    api.func(
        "to_array",
        "t.to_array() -> array",
        "The values as a (nested) array: ints for integer dtypes, floats otherwise.",
        "let rows = t.to_array();",
        |t: TensorHandle| tensor_to_array(&t.0),
    );
    api.func(
        "to_dtype",
        "t.to_dtype(name) -> Tensor",
        "Converts the element type (f32, f16, bf16, f64, u32, i64, u8).",
        "let h = t.to_dtype(\"bf16\");",
        |t: TensorHandle, name: &str| -> RResult<TensorHandle> {
            rt(t.0.to_dtype(parse_dtype(name)?)).map(TensorHandle)
        },
    );
    api.func(
        "detach",
        "t.detach() -> Tensor",
        "The same values cut from the gradient graph.",
        "let frozen = h.detach();",
        |t: TensorHandle| TensorHandle(t.0.detach()),
    );
    api.func(
        "to_string",
        "t.to_string() -> string",
        "The tensor printed with its values, shape and dtype (what `print(t)` shows).",
        "print(t);",
        |t: TensorHandle| format!("{}", t.0),
    );
    api.overload("to_debug", |t: TensorHandle| {
        format!("Tensor{:?} {:?}", t.0.dims(), t.0.dtype())
    });
    api.doc(
        "to_debug",
        "t.to_debug() -> string",
        "A one-line summary: shape and dtype.",
        "debug(t);",
    );
}

/// The tensors of a rhai array, or an error naming the first non-tensor.
pub fn tensors_of(items: &Array) -> RResult<Vec<Tensor>> {
    items
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.clone()
                .try_cast::<TensorHandle>()
                .map(|t| t.0)
                .ok_or_else(|| {
                    script_err(format!("element {i} is a {}, not a Tensor", v.type_name()))
                })
        })
        .collect()
}

fn register_reductions(api: &mut Api) {
    type Reduce = fn(&Tensor, usize) -> candle_core::Result<Tensor>;
    let reductions: [(
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        Reduce,
    ); 4] = [
        (
            "sum",
            "t.sum() -> Tensor; t.sum(dim) -> Tensor",
            "Sum of all entries, or along one dimension (removed).",
            "let total = t.sum().item();\nlet rows = t.sum(1);",
            |t, d| t.sum(d),
        ),
        (
            "mean",
            "t.mean() -> Tensor; t.mean(dim) -> Tensor",
            "Mean of all entries, or along one dimension (removed).",
            "let m = t.mean(0);",
            |t, d| t.mean(d),
        ),
        (
            "max",
            "t.max() -> Tensor; t.max(dim) -> Tensor",
            "Largest entry, or along one dimension (removed).",
            "let best = t.max(1);",
            |t, d| t.max(d),
        ),
        (
            "min",
            "t.min() -> Tensor; t.min(dim) -> Tensor",
            "Smallest entry, or along one dimension (removed).",
            "let worst = t.min().item();",
            |t, d| t.min(d),
        ),
    ];
    for (name, sig, doc, example, f) in reductions {
        api.func(
            name,
            sig,
            doc,
            example,
            move |t: TensorHandle| -> RResult<TensorHandle> {
                let flat = rt(t.0.flatten_all())?;
                rt(f(&flat, 0)).map(TensorHandle)
            },
        );
        api.overload(
            name,
            move |t: TensorHandle, d: i64| -> RResult<TensorHandle> {
                let d = dim(&t.0, d)?;
                rt(f(&t.0, d)).map(TensorHandle)
            },
        );
    }
    api.func(
        "argmax",
        "t.argmax(dim) -> Tensor",
        "Index of the largest entry along dim (u32).",
        "let pred = logits.argmax(-1);",
        |t: TensorHandle, d: i64| -> RResult<TensorHandle> {
            let d = dim(&t.0, d)?;
            rt(t.0.argmax(d)).map(TensorHandle)
        },
    );
    api.func(
        "std",
        "t.std(dim) -> Tensor",
        "Sample standard deviation along dim.",
        "let spread = t.std(0);",
        |t: TensorHandle, d: i64| -> RResult<TensorHandle> {
            let d = dim(&t.0, d)?;
            rt(t.0.var(d).and_then(|v| v.sqrt())).map(TensorHandle)
        },
    );
    api.func(
        "norm",
        "t.norm() -> Tensor",
        "Euclidean norm of all entries.",
        "let n = t.norm().item();",
        |t: TensorHandle| -> RResult<TensorHandle> {
            rt(t.0.sqr().and_then(|s| s.sum_all()).and_then(|s| s.sqrt())).map(TensorHandle)
        },
    );
}

fn register_elementwise(api: &mut Api) {
    type Unary = fn(&Tensor) -> candle_core::Result<Tensor>;
    let unary: [(&'static str, &'static str, &'static str, Unary); 9] = [
        ("exp", "t.exp() -> Tensor", "Elementwise e^x.", |t| t.exp()),
        (
            "log",
            "t.log() -> Tensor",
            "Elementwise natural logarithm.",
            |t| t.log(),
        ),
        (
            "sqrt",
            "t.sqrt() -> Tensor",
            "Elementwise square root.",
            |t| t.sqrt(),
        ),
        (
            "abs",
            "t.abs() -> Tensor",
            "Elementwise absolute value.",
            |t| t.abs(),
        ),
        (
            "tanh",
            "t.tanh() -> Tensor",
            "Elementwise hyperbolic tangent.",
            |t| t.tanh(),
        ),
        (
            "relu",
            "t.relu() -> Tensor",
            "Elementwise max(x, 0).",
            |t| t.relu(),
        ),
        (
            "sigmoid",
            "t.sigmoid() -> Tensor",
            "Elementwise logistic function (differentiable).",
            sigmoid,
        ),
        (
            "softplus",
            "t.softplus() -> Tensor",
            "Elementwise log(1 + e^x), stable and differentiable.",
            softplus,
        ),
        (
            "log_sigmoid",
            "t.log_sigmoid() -> Tensor",
            "Elementwise log σ(x) = -softplus(-x).",
            |t| softplus(&t.neg()?)?.neg(),
        ),
    ];
    for (name, sig, doc, f) in unary {
        let example = match name {
            "sigmoid" => "let p = z.sigmoid();",
            "softplus" => "let l = (-z).softplus().mean();",
            "log_sigmoid" => "let loss = -(z.log_sigmoid()).mean();",
            _ => "let y = t.exp().log();",
        };
        api.func(
            name,
            sig,
            doc,
            example,
            move |t: TensorHandle| -> RResult<TensorHandle> { rt(f(&t.0)).map(TensorHandle) },
        );
    }
    api.func(
        "softmax",
        "t.softmax(dim) -> Tensor",
        "Softmax along dim (composed ops, differentiable).",
        "let p = logits.softmax(-1);",
        |t: TensorHandle, d: i64| -> RResult<TensorHandle> {
            let d = dim(&t.0, d)?;
            rt(candle_nn::ops::softmax(&t.0, d)).map(TensorHandle)
        },
    );
    api.func(
        "log_softmax",
        "t.log_softmax(dim) -> Tensor",
        "Log-softmax along dim (composed ops, differentiable).",
        "let lp = logits.log_softmax(-1);",
        |t: TensorHandle, d: i64| -> RResult<TensorHandle> {
            let d = dim(&t.0, d)?;
            rt(candle_nn::ops::log_softmax(&t.0, d)).map(TensorHandle)
        },
    );
    api.func(
        "clamp",
        "t.clamp(lo, hi) -> Tensor",
        "Elementwise clamp into [lo, hi].",
        "let c = t.clamp(-1.0, 1.0);",
        |t: TensorHandle, lo: f64, hi: f64| -> RResult<TensorHandle> {
            rt(t.0.clamp(lo, hi)).map(TensorHandle)
        },
    );
}
