//! The lexer: source text into tokens, each with its byte offset. Numbers and strings are
//! decoded here (CEL's escapes), once, so that evaluation never looks at text again.

use crate::error::{FilterError, Reason};

/// One token.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Token<'s> {
    /// A name: a root, a field after `.`, a function, or `true`, `false`, `null`, `in`.
    Ident(&'s str),
    /// An integer literal's magnitude; a minus sign before it is a separate token.
    Int(u64),
    /// A floating-point literal (finite).
    Float(f64),
    /// A string literal, decoded.
    Str(String),
    Dot,
    Comma,
    LParen,
    RParen,
    LBracket,
    RBracket,
    Not,
    Minus,
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
    End,
}

impl Token<'_> {
    /// The token as an error message names it.
    pub(crate) fn describe(&self) -> String {
        let text = match self {
            Self::Ident(name) => return format!("'{name}'"),
            Self::Int(_) | Self::Float(_) => "a number",
            Self::Str(_) => "a string",
            Self::Dot => "'.'",
            Self::Comma => "','",
            Self::LParen => "'('",
            Self::RParen => "')'",
            Self::LBracket => "'['",
            Self::RBracket => "']'",
            Self::Not => "'!'",
            Self::Minus => "'-'",
            Self::Eq => "'=='",
            Self::Ne => "'!='",
            Self::Lt => "'<'",
            Self::Le => "'<='",
            Self::Gt => "'>'",
            Self::Ge => "'>='",
            Self::And => "'&&'",
            Self::Or => "'||'",
            Self::End => "the end",
        };
        text.to_owned()
    }
}

/// Splits `source` into tokens with their byte offsets, ending with [`Token::End`].
pub(crate) fn tokenize(source: &str) -> Result<Vec<(usize, Token<'_>)>, FilterError> {
    let mut lexer = Lexer { source, at: 0 };
    let mut tokens = Vec::new();
    loop {
        lexer.skip_spaces();
        let start = lexer.at;
        let token = lexer
            .next_token()
            .map_err(|(position, reason)| FilterError::at(source, position, reason))?;
        let end = token == Token::End;
        tokens.push((start, token));
        if end {
            return Ok(tokens);
        }
    }
}

struct Lexer<'s> {
    source: &'s str,
    at: usize,
}

type LexResult<T> = Result<T, (usize, Reason)>;

impl<'s> Lexer<'s> {
    fn peek(&self) -> Option<char> {
        self.source[self.at..].chars().next()
    }

    fn peek_second(&self) -> Option<char> {
        self.source[self.at..].chars().nth(1)
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.at += c.len_utf8();
        Some(c)
    }

    fn eat(&mut self, c: char) -> bool {
        let ate = self.peek() == Some(c);
        if ate {
            self.at += c.len_utf8();
        }
        ate
    }

    fn skip_spaces(&mut self) {
        while self
            .peek()
            .is_some_and(|c| matches!(c, ' ' | '\t' | '\n' | '\r'))
        {
            self.at += 1;
        }
    }

    fn next_token(&mut self) -> LexResult<Token<'s>> {
        let start = self.at;
        let Some(c) = self.bump() else {
            return Ok(Token::End);
        };
        let token = match c {
            '.' => Token::Dot,
            ',' => Token::Comma,
            '(' => Token::LParen,
            ')' => Token::RParen,
            '[' => Token::LBracket,
            ']' => Token::RBracket,
            '-' => Token::Minus,
            '!' if self.eat('=') => Token::Ne,
            '!' => Token::Not,
            '=' if self.eat('=') => Token::Eq,
            '=' => return Err(did_you_mean(start, "=", "==")),
            '<' if self.eat('=') => Token::Le,
            '<' => Token::Lt,
            '>' if self.eat('=') => Token::Ge,
            '>' => Token::Gt,
            '&' if self.eat('&') => Token::And,
            '&' => return Err(did_you_mean(start, "&", "&&")),
            '|' if self.eat('|') => Token::Or,
            '|' => return Err(did_you_mean(start, "|", "||")),
            '"' | '\'' => Token::Str(self.string(start, c, false)?),
            'r' | 'R' if matches!(self.peek(), Some('"' | '\'')) => {
                let quote = self.bump().unwrap_or(c);
                Token::Str(self.string(start, quote, true)?)
            }
            '0'..='9' => self.number(start)?,
            c if c == '_' || c.is_ascii_alphabetic() => {
                while self
                    .peek()
                    .is_some_and(|c| c == '_' || c.is_ascii_alphanumeric())
                {
                    self.at += 1;
                }
                Token::Ident(&self.source[start..self.at])
            }
            other => return Err((start, Reason::UnexpectedChar(other))),
        };
        Ok(token)
    }

    /// A number: digits, then an optional fraction and exponent; with either it is a float.
    fn number(&mut self, start: usize) -> LexResult<Token<'s>> {
        let digits = |lexer: &mut Self| {
            while lexer.peek().is_some_and(|c| c.is_ascii_digit()) {
                lexer.at += 1;
            }
        };
        digits(self);
        let mut float = false;
        if self.peek() == Some('.') && self.peek_second().is_some_and(|c| c.is_ascii_digit()) {
            self.at += 1;
            digits(self);
            float = true;
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            let mark = self.at;
            self.at += 1;
            if matches!(self.peek(), Some('+' | '-')) {
                self.at += 1;
            }
            if !self.peek().is_some_and(|c| c.is_ascii_digit()) {
                return Err((mark, Reason::InvalidNumber("an exponent needs digits")));
            }
            digits(self);
            float = true;
        }
        if self
            .peek()
            .is_some_and(|c| c == '_' || c.is_ascii_alphanumeric())
        {
            return Err((
                self.at,
                Reason::InvalidNumber("only decimal numbers, without a suffix"),
            ));
        }
        let text = &self.source[start..self.at];
        if float {
            match text.parse::<f64>() {
                Ok(value) if value.is_finite() => Ok(Token::Float(value)),
                _ => Err((start, Reason::InvalidNumber("out of range"))),
            }
        } else if text.len() > 1 && text.starts_with('0') {
            Err((start, Reason::InvalidNumber("no leading zeros")))
        } else {
            text.parse::<u64>()
                .map(Token::Int)
                .map_err(|_| (start, Reason::InvalidNumber("out of range")))
        }
    }

    /// A string after its opening `quote`, with CEL's escapes unless `raw`.
    fn string(&mut self, start: usize, quote: char, raw: bool) -> LexResult<String> {
        let mut text = String::new();
        loop {
            let at = self.at;
            match self.bump() {
                None | Some('\n' | '\r') => return Err((start, Reason::UnterminatedString)),
                Some(c) if c == quote => return Ok(text),
                Some('\\') if !raw => text.push(self.escape(at)?),
                Some(c) => text.push(c),
            }
        }
    }

    /// The character a backslash sequence stands for; `at` is the backslash's offset.
    fn escape(&mut self, at: usize) -> LexResult<char> {
        let invalid = (at, Reason::InvalidEscape);
        let c = self.bump().ok_or(invalid.clone())?;
        let simple = match c {
            'a' => '\u{7}',
            'b' => '\u{8}',
            'f' => '\u{c}',
            'n' => '\n',
            'r' => '\r',
            't' => '\t',
            'v' => '\u{b}',
            '\\' | '?' | '"' | '\'' | '`' => c,
            'x' | 'X' => return self.code_point(at, 2, 16),
            'u' => return self.code_point(at, 4, 16),
            'U' => return self.code_point(at, 8, 16),
            '0'..='3' => {
                self.at -= 1;
                return self.code_point(at, 3, 8);
            }
            _ => return Err(invalid),
        };
        Ok(simple)
    }

    /// `count` digits in `radix` naming a Unicode scalar value.
    fn code_point(&mut self, at: usize, count: usize, radix: u32) -> LexResult<char> {
        let digits = self
            .source
            .get(self.at..self.at + count)
            .filter(|digits| digits.chars().all(|c| c.is_digit(radix)))
            .ok_or((at, Reason::InvalidEscape))?;
        self.at += count;
        u32::from_str_radix(digits, radix)
            .ok()
            .and_then(char::from_u32)
            .ok_or((at, Reason::InvalidEscape))
    }
}

fn did_you_mean(at: usize, found: &'static str, suggestion: &'static str) -> (usize, Reason) {
    (at, Reason::DidYouMean { found, suggestion })
}
