//! Tensor groups for per-group merge weights: each tensor of a checkpoint belongs to one
//! group (embeddings, attention, MLP, norms, output head, or a range of layers), and each
//! group gets its own weight vector.
//!
//! Group specs, matched in the order given, first match wins:
//! - `embeddings`: `embed_tokens`, `embed_in`, `wte`, `wpe`
//! - `attention`: `self_attn`, `.attention.`, `attn`
//! - `mlp`: `.mlp.`
//! - `norms`: names containing `norm` or `ln_`
//! - `lm_head`: `lm_head`, `embed_out`
//! - `layers:A-B`: tensors of layers A..=B (`.layers.{i}.`, `.h.{i}.`)
//! - `rest`: everything not matched before it
//!
//! A tensor matched by no group is an error naming it, so no tensor is merged with weights
//! nobody chose.
//!
//! Patterns are parsed once, into a [`Grouping`], wherever they enter (the search config,
//! the wire: `Grouping` deserialises from its pattern strings and refuses bad ones), and
//! resolved once per model into a [`GroupMap`] (tensor index -> group) by whoever holds
//! the tensor names: the evaluator, the on-disk merge, the config validation.

use serde::{Deserialize, Serialize};

/// A parsed group spec.
#[derive(Clone, Debug, PartialEq)]
pub enum GroupSpec {
    Embeddings,
    Attention,
    Mlp,
    Norms,
    LmHead,
    Layers(usize, usize),
    Rest,
}

impl std::str::FromStr for GroupSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "embeddings" => GroupSpec::Embeddings,
            "attention" => GroupSpec::Attention,
            "mlp" => GroupSpec::Mlp,
            "norms" => GroupSpec::Norms,
            "lm_head" => GroupSpec::LmHead,
            "rest" => GroupSpec::Rest,
            _ => {
                let range = s.strip_prefix("layers:").ok_or_else(|| {
                    format!("unknown group `{s}`: use embeddings, attention, mlp, norms, lm_head, layers:A-B or rest")
                })?;
                let (a, b) = range.split_once('-').unwrap_or((range, range));
                let a: usize = a.parse().map_err(|_| format!("bad layer range `{s}`"))?;
                let b: usize = b.parse().map_err(|_| format!("bad layer range `{s}`"))?;
                if a > b {
                    return Err(format!("empty layer range `{s}`"));
                }
                GroupSpec::Layers(a, b)
            }
        })
    }
}

/// The layer index in a tensor name (`model.layers.3.…`, `gpt_neox.layers.3.…`, `h.3.…`).
fn layer_of(name: &str) -> Option<usize> {
    let parts: Vec<&str> = name.split('.').collect();
    parts.windows(2).find_map(|w| {
        if w[0] == "layers" || w[0] == "h" {
            w[1].parse().ok()
        } else {
            None
        }
    })
}

impl GroupSpec {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            GroupSpec::Embeddings => ["embed_tokens", "embed_in", "wte", "wpe"]
                .iter()
                .any(|p| name.contains(p)),
            GroupSpec::Attention => ["self_attn", ".attention.", "attn"]
                .iter()
                .any(|p| name.contains(p)),
            GroupSpec::Mlp => name.contains(".mlp."),
            GroupSpec::Norms => name.contains("norm") || name.contains("ln_"),
            GroupSpec::LmHead => name.contains("lm_head") || name.contains("embed_out"),
            GroupSpec::Layers(a, b) => layer_of(name).is_some_and(|l| (*a..=*b).contains(&l)),
            GroupSpec::Rest => true,
        }
    }
}

/// The group of each tensor, by index.
pub fn assign(names: &[String], specs: &[GroupSpec]) -> Result<Vec<usize>, String> {
    names
        .iter()
        .map(|n| {
            specs.iter().position(|g| g.matches(n)).ok_or_else(|| {
                format!("tensor `{n}` is in no group; add a group for it, or `rest`")
            })
        })
        .collect()
}

/// Parsed group patterns, in order (first match wins). Serialised as the pattern strings
/// the user wrote.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct Grouping {
    patterns: Vec<String>,
    specs: Vec<GroupSpec>,
}

impl Grouping {
    /// Parses `patterns`; an empty list is refused (no grouping is `None`, not zero groups).
    pub fn parse(patterns: &[String]) -> Result<Grouping, String> {
        if patterns.is_empty() {
            return Err("no group patterns; list groups such as [\"embeddings\", \"attention\", \"mlp\", \"rest\"]".into());
        }
        if let Some((i, p)) = patterns
            .iter()
            .enumerate()
            .find(|(i, p)| patterns[..*i].contains(p))
        {
            return Err(format!(
                "group `{p}` is listed twice (groups {} and {}); the second would match nothing",
                patterns.iter().position(|q| q == p).expect("found"),
                i
            ));
        }
        let specs = patterns
            .iter()
            .map(|g| g.parse::<GroupSpec>())
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Grouping {
            patterns: patterns.to_vec(),
            specs,
        })
    }

    /// The patterns as written.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Number of groups (each gets one weight vector).
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Resolves the groups on a whole model's tensor names: every tensor falls in a group,
    /// and every group holds a tensor (an empty one would be a search dimension that
    /// changes nothing). A pipeline stage holds part of the tensors and resolves them with
    /// [`Grouping::resolve`] alone.
    pub fn resolve_whole(&self, names: &[String]) -> Result<GroupMap, String> {
        let map = self.resolve(names)?;
        if let Some(g) = (0..self.len()).find(|g| !map.group_of.contains(g)) {
            return Err(format!(
                "group `{}` matches no tensor of the model (or earlier groups take all it matches: first match wins); remove it",
                self.patterns[g]
            ));
        }
        Ok(map)
    }

    /// Resolves the groups on a model's tensor names (every tensor must fall in one).
    pub fn resolve(&self, names: &[String]) -> Result<GroupMap, String> {
        Ok(GroupMap {
            group_of: assign(names, &self.specs)?,
            groups: self.len(),
        })
    }
}

impl TryFrom<Vec<String>> for Grouping {
    type Error = String;
    fn try_from(patterns: Vec<String>) -> Result<Grouping, String> {
        Grouping::parse(&patterns)
    }
}

impl From<Grouping> for Vec<String> {
    fn from(g: Grouping) -> Vec<String> {
        g.patterns
    }
}

/// Which group each tensor of one model (by index, in the holder's order) belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupMap {
    group_of: Vec<usize>,
    groups: usize,
}

impl GroupMap {
    /// Every one of `tensors` tensors in one group: a plain merge.
    pub fn single(tensors: usize) -> GroupMap {
        GroupMap {
            group_of: vec![0; tensors],
            groups: 1,
        }
    }

    /// `names` grouped by `grouping`, or all in one group without one.
    pub fn new(grouping: Option<&Grouping>, names: &[String]) -> Result<GroupMap, String> {
        match grouping {
            Some(g) => g.resolve(names),
            None => Ok(GroupMap::single(names.len())),
        }
    }

    /// The group of tensor `i`.
    pub fn group(&self, i: usize) -> usize {
        self.group_of[i]
    }

    /// Group of every tensor, by index.
    pub fn as_slice(&self) -> &[usize] {
        &self.group_of
    }

    pub fn groups(&self) -> usize {
        self.groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_and_neox_names_fall_into_the_expected_groups() {
        let specs: Vec<GroupSpec> = ["embeddings", "lm_head", "norms", "attention", "mlp"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let names: Vec<String> = [
            "model.embed_tokens.weight",
            "lm_head.weight",
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.1.mlp.down_proj.weight",
            "gpt_neox.layers.1.attention.query_key_value.bias",
            "gpt_neox.final_layer_norm.weight",
            "embed_out.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            assign(&names, &specs).unwrap(),
            vec![0, 1, 2, 3, 4, 3, 2, 1]
        );
        let by_layer: Vec<GroupSpec> = ["layers:0-0", "layers:1", "rest"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        assert_eq!(
            assign(&names, &by_layer).unwrap(),
            vec![2, 2, 0, 0, 1, 1, 2, 2]
        );
        let err = assign(&names, &specs[..2]).unwrap_err();
        assert!(
            err.contains("model.layers.0.input_layernorm.weight"),
            "{err}"
        );
        assert!("layers:3-1".parse::<GroupSpec>().is_err());
        assert!("heads"
            .parse::<GroupSpec>()
            .unwrap_err()
            .contains("unknown group"));
    }

    #[test]
    fn a_grouping_round_trips_as_its_patterns_and_refuses_bad_ones() {
        let g = Grouping::parse(&["attention".into(), "rest".into()]).unwrap();
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(v, serde_json::json!(["attention", "rest"]));
        assert_eq!(serde_json::from_value::<Grouping>(v).unwrap(), g);
        let e = serde_json::from_value::<Grouping>(serde_json::json!(["heads"])).unwrap_err();
        assert!(e.to_string().contains("unknown group"), "{e}");
        assert!(Grouping::parse(&[]).is_err());
        let names: Vec<String> = [
            "model.layers.0.self_attn.q_proj.weight",
            "model.norm.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let m = g.resolve(&names).unwrap();
        assert_eq!((m.as_slice(), m.groups()), (&[0, 1][..], 2));
        assert_eq!(GroupMap::new(None, &names).unwrap(), GroupMap::single(2));
    }

    #[test]
    fn a_group_matching_nothing_or_listed_twice_is_refused() {
        let names: Vec<String> = [
            "model.embed_tokens.weight",
            "model.layers.0.mlp.up_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = |v: &[&str]| Grouping::parse(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let e = p(&["layers:7-9", "rest"])
            .unwrap()
            .resolve_whole(&names)
            .unwrap_err();
        assert!(e.contains("`layers:7-9` matches no tensor"), "{e}");
        // A stage of a pipeline holds part of the model: resolve() alone accepts it.
        p(&["layers:7-9", "rest"]).unwrap().resolve(&names).unwrap();
        // Emptied by an earlier group (first match wins).
        let e = p(&["rest", "mlp"])
            .unwrap()
            .resolve_whole(&names)
            .unwrap_err();
        assert!(e.contains("`mlp`"), "{e}");
        let e = p(&["mlp", "mlp", "rest"]).unwrap_err();
        assert!(e.contains("`mlp` is listed twice"), "{e}");
        p(&["mlp", "rest"]).unwrap().resolve_whole(&names).unwrap();
    }
}
