//! Checks the Rust mirrors in `maps.rs` against the compiled object's BTF
//! (sizes and every field offset), like Cilium's alignchecker. aya itself only
//! compares sizes, so a reordered field would otherwise go unnoticed.

use std::collections::HashMap;

use object::{Object, ObjectSection};

/// struct name -> (size, [(field, byte offset)])
fn btf_structs(obj: &[u8]) -> HashMap<String, (usize, Vec<(String, usize)>)> {
    let file = object::File::parse(obj).expect("ELF");
    let btf = file
        .section_by_name(".BTF")
        .expect(".BTF section (compile with -g)")
        .data()
        .expect("BTF data");
    let u32_at = |o: usize| u32::from_le_bytes(btf[o..o + 4].try_into().unwrap());
    assert_eq!(u16::from_le_bytes([btf[0], btf[1]]), 0xEB9F, "BTF magic");
    let hdr_len = u32_at(4) as usize;
    let (type_off, type_len, str_off) = (u32_at(8) as usize, u32_at(12) as usize, u32_at(16) as usize);
    let types = hdr_len + type_off;
    let strs = hdr_len + str_off;
    let name = |off: u32| {
        let s = &btf[strs + off as usize..];
        String::from_utf8_lossy(&s[..s.iter().position(|&b| b == 0).unwrap()]).into_owned()
    };
    let mut out = HashMap::new();
    let mut p = types;
    while p < types + type_len {
        let (name_off, info, size) = (u32_at(p), u32_at(p + 4), u32_at(p + 8));
        let kind = (info >> 24) & 0x1f;
        let vlen = (info & 0xffff) as usize;
        let kflag = info >> 31 == 1;
        p += 12;
        let extra = match kind {
            1 | 14 | 17 => 4,     // INT, VAR, DECL_TAG
            3 => 12,              // ARRAY
            4 | 5 => 12 * vlen,   // STRUCT, UNION
            6 | 13 => 8 * vlen,   // ENUM, FUNC_PROTO
            15 | 19 => 12 * vlen, // DATASEC, ENUM64
            _ => 0,
        };
        if kind == 4 {
            let fields = (0..vlen)
                .map(|i| {
                    let m = p + 12 * i;
                    let off = u32_at(m + 8);
                    let bits = if kflag { off & 0xff_ffff } else { off };
                    (name(u32_at(m)), (bits / 8) as usize)
                })
                .collect();
            out.insert(name(name_off), (size as usize, fields));
        }
        p += extra;
    }
    out
}

#[test]
fn layouts_match_btf() {
    let btf = btf_structs(crate::object());
    for (cname, size, fields) in crate::maps::layouts() {
        let (bsize, bfields) = btf
            .get(cname)
            .unwrap_or_else(|| panic!("struct {cname} not in the object's BTF"));
        assert_eq!(size, *bsize, "size of {cname}");
        let bfields: Vec<(&str, usize)> = bfields.iter().map(|(n, o)| (n.as_str(), *o)).collect();
        assert_eq!(fields, bfields, "fields and offsets of {cname} (Rust vs ferry.h)");
    }
}
