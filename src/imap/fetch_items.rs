//! The item list of a FETCH command, cut into its top-level items without decoding them:
//! the one scanner behind the rewrites that run before imap-codec sees a FETCH (BINARY items
//! become their BODY twins in `binary.rs`, OBJECTID items come out in `objectid.rs`).
//!
//! What is inside brackets or parentheses belongs to the item it is in
//! (`BODY[HEADER.FIELDS (A B)]<0.10>` is one item).

/// A `tag [UID] FETCH set items [modifiers]` command cut at its items.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchItems<'a> {
    /// `tag [UID] FETCH set ` (everything before the items).
    pub head: &'a [u8],
    /// The top-level items, in order (a single unparenthesized item is a list of one).
    pub items: Vec<&'a [u8]>,
    /// The items were a parenthesized list.
    pub parenthesized: bool,
    /// Everything after the items (modifiers, the line ending).
    pub tail: &'a [u8],
}

/// Longest tag, verb or sequence set looked at: a longer one is no FETCH this module rewrites
/// (imap-codec then judges the command as it is).
const MAX_WORD_BYTES: usize = 64;

/// Cuts `bytes` if it is a `[UID] FETCH` whose item list is complete on one line; `None`
/// otherwise.
pub fn split_fetch(bytes: &[u8]) -> Option<FetchItems<'_>> {
    let mut at = 0;
    let mut word = || -> Option<&[u8]> {
        let start = at;
        let len = bytes
            .get(start..)?
            .iter()
            .take(MAX_WORD_BYTES)
            .position(|&b| b == b' ')?;
        at = start + len + 1;
        Some(&bytes[start..start + len])
    };
    word()?;
    let mut verb = word()?;
    if verb.eq_ignore_ascii_case(b"UID") {
        verb = word()?;
    }
    if !verb.eq_ignore_ascii_case(b"FETCH") {
        return None;
    }
    word()?;
    let head = &bytes[..at];
    let rest = &bytes[at..];
    if rest.first() != Some(&b'(') {
        let len = rest
            .iter()
            .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
            .unwrap_or(rest.len());
        return Some(FetchItems {
            head,
            items: vec![&rest[..len]],
            parenthesized: false,
            tail: &rest[len..],
        });
    }
    let mut items = Vec::new();
    let mut depth = 0usize;
    let mut brackets = 0usize;
    let mut item_start = 1;
    for (i, &b) in rest.iter().enumerate().skip(1) {
        match b {
            b'[' => brackets += 1,
            b']' => brackets = brackets.saturating_sub(1),
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b')' | b' ' if brackets == 0 && depth == 0 => {
                let item = &rest[item_start..i];
                if !item.is_empty() {
                    items.push(item);
                }
                item_start = i + 1;
                if b == b')' {
                    return Some(FetchItems {
                        head,
                        items,
                        parenthesized: true,
                        tail: &rest[i + 1..],
                    });
                }
            }
            b'\r' | b'\n' => return None,
            _ => {}
        }
    }
    None
}

impl FetchItems<'_> {
    /// The command again with `items` in place of the original ones (in a parenthesized list
    /// if the original was one).
    pub fn join<T: AsRef<[u8]>>(&self, items: &[T]) -> Vec<u8> {
        let mut command = self.head.to_vec();
        if self.parenthesized {
            command.push(b'(');
        }
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                command.push(b' ');
            }
            command.extend_from_slice(item.as_ref());
        }
        if self.parenthesized {
            command.push(b')');
        }
        command.extend_from_slice(self.tail);
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn items_are_cut_at_the_top_level_only() {
        let command = b"a UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (A B)]<0.5>  UID) (CHANGEDSINCE 3)\r\n";
        let fetch = split_fetch(command).unwrap();
        assert_eq!(fetch.head, b"a UID FETCH 1:* ");
        assert_eq!(
            fetch.items,
            vec![
                &b"FLAGS"[..],
                b"BODY.PEEK[HEADER.FIELDS (A B)]<0.5>",
                b"UID"
            ]
        );
        assert_eq!(fetch.tail, b" (CHANGEDSINCE 3)\r\n");
        assert_eq!(
            fetch.join(&fetch.items),
            b"a UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (A B)]<0.5> UID) (CHANGEDSINCE 3)\r\n"
        );
        let single = split_fetch(b"b FETCH 2 BODY[1]\r\n").unwrap();
        assert_eq!(
            (&single.items, single.parenthesized),
            (&vec![&b"BODY[1]"[..]], false)
        );
        assert_eq!(single.join(&["UID"]), b"b FETCH 2 UID\r\n");
        assert_eq!(split_fetch(b"c SEARCH (ALL)\r\n"), None);
        assert_eq!(split_fetch(b"d FETCH 1 (FLAGS\r\n"), None);
        assert_eq!(split_fetch(b"e FETCH"), None);
    }

    proptest! {
        /// Whatever the input, the cut never panics, and the joined command cuts into the
        /// same items again.
        #[test]
        fn splitting_never_panics_and_joining_is_stable(text in "[A-Za-z0-9 .\\[\\]()<>*:\r\n]{0,80}") {
            let command = format!("t FETCH 1 {text}");
            if let Some(fetch) = split_fetch(command.as_bytes()) {
                let joined = fetch.join(&fetch.items);
                let again = split_fetch(&joined);
                prop_assert_eq!(again.as_ref().map(|f| &f.items), Some(&fetch.items));
                prop_assert_eq!(again.map(|f| f.tail), Some(fetch.tail));
            }
            let _ = split_fetch(text.as_bytes());
        }
    }
}
