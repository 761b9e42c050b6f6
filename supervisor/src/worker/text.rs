//! Token pieces to text: pieces are bytes that may split a UTF-8 character, and a stop string
//! may span pieces. [`TextStream`] emits only text that is final: complete characters that
//! cannot be the start of a stop string.

/// Turns token bytes into emitted text, holding back what might still become a stop string.
#[derive(Debug, Default)]
pub struct TextStream {
    stops: Vec<String>,
    pending: Vec<u8>,
    held: String,
    stopped: bool,
}

impl TextStream {
    pub fn new(stops: &[String]) -> Self {
        TextStream { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), ..Default::default() }
    }

    /// Whether a stop string was seen (nothing more will be emitted).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Adds a token's bytes; returns the text that is now final (may be empty).
    pub fn push(&mut self, bytes: &[u8]) -> String {
        if self.stopped {
            return String::new();
        }
        self.pending.extend_from_slice(bytes);
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    self.held.push_str(s);
                    self.pending.clear();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // The valid part is UTF-8 by construction.
                    self.held.push_str(&String::from_utf8_lossy(&self.pending[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next piece.
                        None => {
                            self.pending.drain(..valid);
                            break;
                        }
                        Some(bad) => {
                            self.held.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
        self.release()
    }

    /// The end of generation: everything held is final.
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let mut out = std::mem::take(&mut self.held);
        out.push_str(&String::from_utf8_lossy(&self.pending));
        self.pending.clear();
        out
    }

    fn release(&mut self) -> String {
        let first_stop = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first_stop {
            self.stopped = true;
            let out = self.held[..at].to_owned();
            self.held.clear();
            return out;
        }
        // Keep the longest tail that is a proper prefix of some stop string.
        let mut keep = 0;
        for stop in &self.stops {
            for (i, _) in stop.char_indices().skip(1) {
                if i > keep && self.held.ends_with(&stop[..i]) {
                    keep = i;
                }
            }
        }
        let split = self.held.len() - keep;
        let out = self.held[..split].to_owned();
        self.held.drain(..split);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&[u8]]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| (*s).to_owned()).collect();
        let mut t = TextStream::new(&stops);
        let mut out = String::new();
        for p in pieces {
            out.push_str(&t.push(p));
            if t.stopped() {
                return (out, true);
            }
        }
        out.push_str(&t.finish());
        (out, false)
    }

    #[test]
    fn split_characters_are_joined() {
        let euro = "€".as_bytes();
        assert_eq!(run(&[], &[b"a", &euro[..1], &euro[1..], b"b"]), ("a€b".into(), false));
    }

    #[test]
    fn stop_strings_across_pieces_end_the_text_before_them() {
        assert_eq!(run(&["\nUser:"], &[b"Hi", b" there\nUs", b"er: more"]), ("Hi there".into(), true));
        assert_eq!(run(&["END"], &[b"abcE", b"N", b"x"]), ("abcENx".into(), false));
    }

    #[test]
    fn held_text_is_released_when_the_stop_does_not_come() {
        let stops = vec!["<|im_end|>".to_owned()];
        let mut t = TextStream::new(&stops);
        assert_eq!(t.push(b"x<|im"), "x");
        assert_eq!(t.push(b"!"), "<|im!");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        assert_eq!(run(&[], &[b"a\xffb"]), ("a\u{fffd}b".into(), false));
    }
}
