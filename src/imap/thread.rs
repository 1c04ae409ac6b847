//! THREAD (RFC 5256 section 3): ORDEREDSUBJECT and REFERENCES over the messages a SEARCH
//! matched, and the `* THREAD` response.
//!
//! Both algorithms are pure functions of [`ThreadMessage`]s (in mailbox order) that build a
//! [`Forest`] in an arena: no recursion anywhere, so a reply chain of any depth cannot
//! overflow the stack, and reference cycles are refused link by link (a link that would
//! make a container its own ancestor is not made).

use std::collections::HashMap;
use std::sync::Arc;

use super::sort::base_subject;

/// One message as threading sees it.
#[derive(Debug, Clone, Default)]
pub struct ThreadMessage {
    /// What the response names it by (sequence number or UID).
    pub number: u32,
    /// Its Message-ID (without angle brackets), if it has one.
    pub message_id: Option<Arc<str>>,
    /// The Message-IDs of References, oldest first, or else the first one of In-Reply-To.
    /// (Shared: the keys come from a cache of them per message body.)
    pub references: Arc<[Arc<str>]>,
    /// The base subject, case-mapped ([`super::sort::casemap`]).
    pub base_subject: Arc<str>,
    /// The base subject extraction found a reply or a forward.
    pub reply_or_forward: bool,
    /// The sent date (seconds, UTC).
    pub sent_date: i64,
}

/// Threads: containers in an arena; a container without a message is a dummy.
#[derive(Debug, Default)]
pub struct Forest {
    /// Index into the input messages, or `None` for a dummy.
    message: Vec<Option<usize>>,
    children: Vec<Vec<usize>>,
    roots: Vec<usize>,
}

impl Forest {
    fn add(&mut self, message: Option<usize>) -> usize {
        self.message.push(message);
        self.children.push(Vec::new());
        self.message.len() - 1
    }

    /// The threads as RFC 5256 thread-lists: `(n)`, `(n m)` for a chain, `(n (..)(..))` for
    /// several children, `((..)(..))` under a dummy.
    pub fn write(&self, messages: &[ThreadMessage], out: &mut Vec<u8>) {
        enum Step {
            Text(&'static [u8]),
            Visit(usize),
        }
        let mut stack: Vec<Step> = Vec::new();
        for &root in self.roots.iter().rev() {
            stack.push(Step::Text(b")"));
            stack.push(Step::Visit(root));
            stack.push(Step::Text(b"("));
        }
        while let Some(step) = stack.pop() {
            let node = match step {
                Step::Text(text) => {
                    out.extend_from_slice(text);
                    continue;
                }
                Step::Visit(node) => node,
            };
            let numbered = match self.message[node] {
                Some(m) => {
                    super::sort_keys::push_decimal(out, messages[m].number);
                    true
                }
                None => false,
            };
            let children = &self.children[node];
            match children.len() {
                0 => {}
                1 => {
                    // thread-members: "a b c" for a chain.
                    stack.push(Step::Visit(children[0]));
                    if numbered {
                        stack.push(Step::Text(b" "));
                    }
                }
                _ => {
                    // thread-nested: "a (b)(c)".
                    for &child in children.iter().rev() {
                        stack.push(Step::Text(b")"));
                        stack.push(Step::Visit(child));
                        stack.push(Step::Text(b"("));
                    }
                    if numbered {
                        stack.push(Step::Text(b" "));
                    }
                }
            }
        }
    }

    /// Containers in post-order (children before their parent), without recursion.
    fn post_order(&self) -> Vec<usize> {
        let mut order = Vec::with_capacity(self.message.len());
        let mut stack: Vec<(usize, bool)> = self.roots.iter().rev().map(|&r| (r, false)).collect();
        while let Some((node, expanded)) = stack.pop() {
            if expanded {
                order.push(node);
                continue;
            }
            stack.push((node, true));
            for &child in self.children[node].iter().rev() {
                stack.push((child, false));
            }
        }
        order
    }

    /// Sorts every set of siblings (and the roots) by sent date, then mailbox order; a dummy
    /// sorts as its first child (RFC 5256 section 3, REFERENCES step 6).
    fn sort_siblings(&mut self, messages: &[ThreadMessage]) {
        let order = self.post_order();
        let mut key: Vec<(i64, usize)> = vec![(i64::MAX, usize::MAX); self.message.len()];
        let sort = |list: &mut Vec<usize>, key: &[(i64, usize)]| {
            list.sort_by_key(|&c| key[c]);
        };
        for node in order {
            let mut children = std::mem::take(&mut self.children[node]);
            sort(&mut children, &key);
            key[node] = match self.message[node] {
                Some(m) => (messages[m].sent_date, m),
                None => children.first().map_or((i64::MAX, usize::MAX), |&c| key[c]),
            };
            self.children[node] = children;
        }
        let mut roots = std::mem::take(&mut self.roots);
        sort(&mut roots, &key);
        self.roots = roots;
    }
}

/// THREAD=ORDEREDSUBJECT: messages grouped by base subject; in each group, the oldest is the
/// parent of the others (in date order); groups ordered by their first message's date.
pub fn ordered_subject(messages: &[ThreadMessage]) -> Forest {
    let mut order: Vec<usize> = (0..messages.len()).collect();
    order.sort_by(|&a, &b| {
        let (ma, mb) = (&messages[a], &messages[b]);
        (&ma.base_subject, ma.sent_date, a).cmp(&(&mb.base_subject, mb.sent_date, b))
    });
    let mut forest = Forest::default();
    let mut current: Option<(usize, &str)> = None;
    for m in order {
        let subject = &*messages[m].base_subject;
        let node = forest.add(Some(m));
        match current {
            Some((parent, s)) if s == subject => forest.children[parent].push(node),
            _ => {
                forest.roots.push(node);
                current = Some((node, subject));
            }
        }
    }
    forest.roots.sort_by_key(|&r| {
        let m = forest.message[r].unwrap_or(usize::MAX);
        (messages.get(m).map_or(i64::MAX, |x| x.sent_date), m)
    });
    forest
}

/// THREAD=REFERENCES (RFC 5256 section 3, steps 1 to 6).
pub fn references(messages: &[ThreadMessage]) -> Forest {
    let mut forest = Forest::default();
    // Step 1: containers by Message-ID, linked by parent pointers only (children lists are
    // built once links are final).
    let mut parent: Vec<Option<usize>> = Vec::new();
    let mut by_id: HashMap<&str, usize> = HashMap::new();
    fn container_of<'m>(
        by_id: &mut HashMap<&'m str, usize>,
        id: &'m str,
        forest: &mut Forest,
        parent: &mut Vec<Option<usize>>,
    ) -> usize {
        *by_id.entry(id).or_insert_with(|| {
            parent.push(None);
            forest.add(None)
        })
    }
    // Whether making `parent_node` the parent of `child` would close a loop: `child` is
    // `parent_node` or one of its ancestors.
    let would_loop = |parent: &[Option<usize>], parent_node: usize, child: usize| {
        let mut at = Some(parent_node);
        while let Some(node) = at {
            if node == child {
                return true;
            }
            at = parent[node];
        }
        false
    };
    for (m, message) in messages.iter().enumerate() {
        // The message's own container: the one of its Message-ID unless another message
        // already holds it (a duplicate gets a container of its own, as a message without
        // a Message-ID does).
        let own = match message.message_id.as_deref() {
            Some(id) => {
                let c = container_of(&mut by_id, id, &mut forest, &mut parent);
                if forest.message[c].is_none() {
                    c
                } else {
                    parent.push(None);
                    forest.add(None)
                }
            }
            None => {
                parent.push(None);
                forest.add(None)
            }
        };
        forest.message[own] = Some(m);
        // 1.A: link the references in order; an existing parent is kept; no loops.
        let mut previous: Option<usize> = None;
        for id in message.references.iter() {
            let c = container_of(&mut by_id, id, &mut forest, &mut parent);
            if let Some(p) = previous {
                if parent[c].is_none() && !would_loop(&parent, p, c) {
                    parent[c] = Some(p);
                }
            }
            previous = Some(c);
        }
        // 1.B: the last reference (or none) is the message's parent, replacing any parent
        // a truncated References of another message gave it; no loops.
        if parent[own] != previous {
            parent[own] = None;
            if let Some(p) = previous {
                if !would_loop(&parent, p, own) {
                    parent[own] = Some(p);
                }
            }
        }
    }
    // Step 2: children lists and the root set (containers in creation order).
    for (c, p) in parent.iter().enumerate() {
        match p {
            Some(p) => forest.children[*p].push(c),
            None => forest.roots.push(c),
        }
    }
    // Step 4: prune dummies: one without children goes; one with children gives them to its
    // parent's level, except at the root when it has more than one.
    for node in forest.post_order() {
        let children = std::mem::take(&mut forest.children[node]);
        let mut kept = Vec::with_capacity(children.len());
        for child in children {
            if forest.message[child].is_some() {
                kept.push(child);
            } else {
                kept.append(&mut forest.children[child]);
            }
        }
        forest.children[node] = kept;
    }
    let roots = std::mem::take(&mut forest.roots);
    for root in roots {
        if forest.message[root].is_some() || forest.children[root].len() > 1 {
            forest.roots.push(root);
        } else if let Some(&only) = forest.children[root].first() {
            forest.roots.push(only);
        }
    }
    // Step 5: gather root threads with the same base subject.
    let subject_of = |forest: &Forest, node: usize| -> Option<usize> {
        match forest.message[node] {
            Some(m) => Some(m),
            None => forest.children[node]
                .first()
                .and_then(|&c| forest.message[c]),
        }
    };
    let mut table: HashMap<&str, usize> = HashMap::new();
    for &root in &forest.roots {
        let Some(m) = subject_of(&forest, root) else {
            continue;
        };
        let subject = &*messages[m].base_subject;
        if subject.is_empty() {
            continue;
        }
        match table.get(subject) {
            None => {
                table.insert(subject, root);
            }
            Some(&held) => {
                let held_is_dummy = forest.message[held].is_none();
                let is_dummy = forest.message[root].is_none();
                let held_reply = forest.message[held].is_some_and(|h| messages[h].reply_or_forward);
                let reply = messages[m].reply_or_forward && !is_dummy;
                if !held_is_dummy && (is_dummy || (held_reply && !reply)) {
                    table.insert(subject, root);
                }
            }
        }
    }
    let roots = std::mem::take(&mut forest.roots);
    let mut gone = vec![false; forest.message.len()];
    // Where each root (or the dummy that replaced it) stands in the new root list.
    let mut new_roots: Vec<usize> = Vec::with_capacity(roots.len());
    let mut slot: HashMap<usize, usize> = HashMap::new();
    for &root in &roots {
        slot.insert(root, new_roots.len());
        new_roots.push(root);
    }
    for &root in &roots {
        let Some(m) = subject_of(&forest, root) else {
            continue;
        };
        let subject = &*messages[m].base_subject;
        if subject.is_empty() {
            continue;
        }
        let Some(&held) = table.get(subject) else {
            continue;
        };
        if held == root {
            continue;
        }
        let held_is_dummy = forest.message[held].is_none();
        let is_dummy = forest.message[root].is_none();
        let held_reply = forest.message[held].is_some_and(|h| messages[h].reply_or_forward);
        let reply = !is_dummy && messages[m].reply_or_forward;
        if held_is_dummy && is_dummy {
            // Both dummies: the current one's children join the held one's.
            let mut moved = std::mem::take(&mut forest.children[root]);
            forest.children[held].append(&mut moved);
            gone[root] = true;
        } else if held_is_dummy || (reply && !held_reply) {
            forest.children[held].push(root);
            gone[root] = true;
        } else {
            // Neither is a child of the other: a new dummy holds both, in the held one's
            // place among the roots and in the table.
            let dummy = forest.add(None);
            gone.push(false);
            forest.children[dummy] = vec![held, root];
            gone[root] = true;
            if let Some(&at) = slot.get(&held) {
                new_roots[at] = dummy;
                slot.insert(dummy, at);
            }
            table.insert(subject, dummy);
        }
    }
    forest.roots = new_roots.into_iter().filter(|&r| !gone[r]).collect();
    // Step 6: siblings by sent date.
    forest.sort_siblings(messages);
    forest
}

/// `* THREAD ...` for `forest`, with its CRLF.
pub fn write_thread_response(out: &mut Vec<u8>, forest: &Forest, messages: &[ThreadMessage]) {
    out.extend_from_slice(b"* THREAD");
    if !forest.roots.is_empty() {
        out.push(b' ');
        forest.write(messages, out);
    }
    out.extend_from_slice(b"\r\n");
}

/// Most Message-IDs taken from one References field (the newest kept): enough for any real
/// thread, and a bound on the links one message can make.
pub const MAX_REFERENCES: usize = 500;

/// The Message-IDs (`<...>`, brackets and whitespace removed) of a field value, comments
/// skipped, at most [`MAX_REFERENCES`] (the last ones).
pub fn message_ids(value: &[u8]) -> Vec<String> {
    let mut ids = Vec::new();
    let mut i = 0;
    let mut depth = 0usize;
    while i < value.len() {
        let b = value[i];
        match b {
            b'(' => depth += 1,
            b')' => depth = depth.saturating_sub(1),
            b'\\' if depth > 0 => i += 1,
            b'<' if depth == 0 => {
                let Some(len) = value[i + 1..].iter().position(|&c| c == b'>') else {
                    break;
                };
                let id: String = String::from_utf8_lossy(&value[i + 1..i + 1 + len])
                    .chars()
                    .filter(|c| !c.is_whitespace())
                    .collect();
                if !id.is_empty() {
                    ids.push(id);
                }
                i += len + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if ids.len() > MAX_REFERENCES {
        ids.drain(..ids.len() - MAX_REFERENCES);
    }
    ids
}

/// A [`ThreadMessage`] from a header block (References, or else In-Reply-To's first id).
pub fn thread_message(number: u32, header: Option<&[u8]>, sent_date: i64) -> ThreadMessage {
    use super::fetch::first_field;
    let field_ids = |name: &[u8]| {
        header
            .and_then(|h| first_field(h, name))
            .map(|f| message_ids(f.value))
            .unwrap_or_default()
    };
    let mut references = field_ids(b"references");
    if references.is_empty() {
        references = field_ids(b"in-reply-to");
        references.truncate(1);
    }
    let (base, reply_or_forward) = base_subject(&super::sort::subject_text(header));
    ThreadMessage {
        number,
        message_id: field_ids(b"message-id").into_iter().next().map(Arc::from),
        references: references.into_iter().map(Arc::from).collect(),
        base_subject: Arc::from(super::sort::casemap(&base)),
        reply_or_forward,
        sent_date,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Message `number` sent at `date` with `id`, References `refs` (space separated ids)
    /// and `subject`.
    fn msg(number: u32, date: i64, id: &str, refs: &str, subject: &str) -> ThreadMessage {
        let (base, reply) = base_subject(subject);
        ThreadMessage {
            number,
            message_id: (!id.is_empty()).then(|| Arc::from(id)),
            references: refs.split_whitespace().map(Arc::from).collect(),
            base_subject: Arc::from(super::super::sort::casemap(&base)),
            reply_or_forward: reply,
            sent_date: date,
        }
    }

    fn threads(forest: &Forest, messages: &[ThreadMessage]) -> String {
        let mut out = Vec::new();
        forest.write(messages, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn check_references(messages: &[ThreadMessage], expected: &str) {
        assert_eq!(threads(&references(messages), messages), expected);
    }

    #[test]
    fn replies_nest_under_their_parents() {
        let messages = [
            msg(1, 10, "a", "", "Hello"),
            msg(2, 20, "b", "a", "Re: Hello"),
            msg(3, 30, "c", "a b", "Re: Hello"),
            msg(4, 25, "d", "a", "Re: Hello"),
            msg(5, 5, "e", "", "Other"),
        ];
        check_references(&messages, "(5)(1 (2 3)(4))");
    }

    #[test]
    fn missing_parents_become_dummies_and_are_pruned() {
        // 2 and 3 reply to a message that is not in the mailbox: a dummy root with two
        // children stays; 4 replies to a missing message alone: it is promoted.
        let messages = [
            msg(2, 20, "b", "gone", "Re: Lost"),
            msg(3, 30, "c", "gone", "Re: Lost"),
            msg(4, 40, "d", "x y", "Re: Alone"),
        ];
        check_references(&messages, "((2)(3))(4)");
    }

    #[test]
    fn cycles_in_references_are_not_followed() {
        // a says its parent is b, b says its parent is a; c lists a then itself then a.
        let messages = [
            msg(1, 10, "a", "b", "One"),
            msg(2, 20, "b", "a", "Two"),
            msg(3, 30, "c", "a c a", "Three"),
        ];
        let forest = references(&messages);
        let written = threads(&forest, &messages);
        for n in ["1", "2", "3"] {
            assert_eq!(written.matches(n).count(), 1, "{n} exactly once: {written}");
        }
        // 1's References make b its parent; b's own link to a would close a loop and is
        // not made; c goes under a (its last reference), its self reference is ignored.
        assert_eq!(written, "(2 1 3)");
    }

    #[test]
    fn duplicate_message_ids_keep_both_messages() {
        let messages = [
            msg(1, 10, "a", "", "Dup"),
            msg(2, 20, "a", "", "Dup"),
            msg(3, 30, "b", "a", "Re: Dup"),
        ];
        // The second "a" gets an id of its own; the reply goes under the first; the two
        // roots with the same subject are gathered under a dummy.
        check_references(&messages, "((1 3)(2))");
    }

    #[test]
    fn subjects_gather_root_threads() {
        let messages = [
            msg(1, 10, "a", "", "Report"),
            msg(2, 20, "b", "", "Re: Report"),
            msg(3, 30, "c", "", "Fwd: Report"),
            msg(4, 40, "d", "", "Report"),
            msg(5, 50, "e", "", ""),
            msg(6, 60, "f", "", ""),
        ];
        // Replies without References join the original (not a reply) as children; the
        // second non-reply "Report" makes a dummy holding both; empty subjects stay apart.
        check_references(&messages, "((1 (2)(3))(4))(5)(6)");
    }

    #[test]
    fn in_reply_to_only_and_deep_chains() {
        let mut messages: Vec<ThreadMessage> = (1..=5_000u32)
            .map(|n| {
                let parent = if n > 1 {
                    format!("m{}", n - 1)
                } else {
                    String::new()
                };
                msg(n, i64::from(n), &format!("m{n}"), &parent, "Chain")
            })
            .collect();
        messages.reverse();
        let forest = references(&messages);
        let written = threads(&forest, &messages);
        let expected: Vec<String> = (1..=5_000).map(|n| n.to_string()).collect();
        assert_eq!(written, format!("({})", expected.join(" ")));
    }

    #[test]
    fn ordered_subject_as_in_rfc_5256() {
        let messages = [
            msg(1, 30, "", "", "Re: Lunch"),
            msg(2, 10, "", "", "Lunch"),
            msg(3, 5, "", "", "Zebra"),
            msg(4, 40, "", "", "lunch"),
            msg(5, 20, "", "", "Zebra (fwd)"),
            msg(6, 50, "", "", "Alone"),
        ];
        let forest = ordered_subject(&messages);
        assert_eq!(threads(&forest, &messages), "(3 5)(2 (1)(4))(6)");
    }

    #[test]
    fn message_ids_are_taken_from_fields() {
        assert_eq!(
            message_ids(b" <a@b> (comment <x@y>)\r\n <c\r\n @d> junk <>\r\n"),
            vec!["a@b".to_owned(), "c@d".to_owned()]
        );
        let header = b"Message-ID: <m@x>\r\nIn-Reply-To: <p@x> <q@x>\r\nSubject: Re: Hi\r\n\r\n";
        let m = thread_message(7, Some(header), 1);
        assert_eq!(m.message_id.as_deref(), Some("m@x"));
        assert_eq!(&*m.references, &[Arc::<str>::from("p@x")]);
        assert_eq!(&*m.base_subject, "HI");
        assert!(m.reply_or_forward);
    }

    fn arbitrary_messages() -> impl Strategy<Value = Vec<ThreadMessage>> {
        let id = prop::sample::select(vec!["a", "b", "c", "d", "e", "f", ""]);
        let refs = proptest::collection::vec(
            prop::sample::select(vec!["a", "b", "c", "d", "e", "f", "x", "y"]),
            0..6,
        );
        let subject = prop::sample::select(vec!["S", "Re: S", "T", "Fwd: T", "", "[S]"]);
        proptest::collection::vec((id, refs, subject, 0i64..5), 0..24).prop_map(|items| {
            items
                .into_iter()
                .enumerate()
                .map(|(k, (id, refs, subject, date))| {
                    msg(k as u32 + 1, date, id, &refs.join(" "), subject)
                })
                .collect()
        })
    }

    /// Every number of `written` (a THREAD response body), in order.
    fn numbers(written: &str) -> Vec<u32> {
        written
            .split(|c: char| !c.is_ascii_digit())
            .filter(|s| !s.is_empty())
            .map(|s| s.parse().unwrap())
            .collect()
    }

    /// The response is well formed: parentheses balance, no `()`, every list holds a number
    /// or at least two nested lists.
    fn well_formed(written: &str) -> bool {
        let mut depth = 0i64;
        for c in written.chars() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                _ => {}
            }
            if depth < 0 {
                return false;
            }
        }
        depth == 0 && !written.contains("()")
    }

    proptest! {
        /// Whatever the References (cycles, self references, duplicate and missing
        /// Message-IDs), each message appears exactly once and the answer is well formed.
        #[test]
        fn every_message_appears_once(messages in arbitrary_messages()) {
            for forest in [references(&messages), ordered_subject(&messages)] {
                let written = threads(&forest, &messages);
                let mut found = numbers(&written);
                found.sort_unstable();
                let expected: Vec<u32> = (1..=messages.len() as u32).collect();
                prop_assert_eq!(&found, &expected, "{}", written);
                prop_assert!(well_formed(&written), "{}", written);
            }
        }

        /// The threads do not depend on how the mailbox numbers its messages: renumbering
        /// renumbers the answer.
        #[test]
        fn numbering_only_renames(messages in arbitrary_messages()) {
            let renumbered: Vec<ThreadMessage> = messages
                .iter()
                .map(|m| ThreadMessage { number: m.number + 1000, ..m.clone() })
                .collect();
            let a = threads(&references(&messages), &messages);
            let b = threads(&references(&renumbered), &renumbered);
            let shifted: Vec<u32> = numbers(&a).iter().map(|n| n + 1000).collect();
            prop_assert_eq!(numbers(&b), shifted);
        }
    }
}
