//! The parser: tokens into the compiled tree, by recursive descent over CEL's precedence
//! levels (`||`, then `&&`, then one comparison, then `!` and `-`, then `.field`, `[…]` and
//! methods), enforcing the limits as it goes so that no input makes it recurse or allocate
//! beyond them.

use serde_json::{Number, Value};

use crate::Limits;
use crate::ast::{Expr, Path, Relation, Root, Step, TextTest};
use crate::error::{FilterError, Reason};
use crate::lexer::{Token, tokenize};

/// Parses a whole filter.
pub(crate) fn parse(source: &str, limits: &Limits) -> Result<Expr, FilterError> {
    let mut parser = Parser::new(source, limits)?;
    let expr = parser.condition(|parser| parser.or())?;
    parser.expect(&Token::End, "an operator or the end")?;
    Ok(expr)
}

/// Parses a comma-separated list of paths relative to `value` (a projection's source).
pub(crate) fn parse_paths(source: &str, limits: &Limits) -> Result<Vec<Vec<String>>, FilterError> {
    let mut parser = Parser::new(source, limits)?;
    let mut paths = Vec::new();
    loop {
        if paths.len() == limits.max_fields {
            return Err(parser.error(Reason::TooManyFields {
                limit: limits.max_fields,
            }));
        }
        let mut steps = Vec::new();
        loop {
            let at = parser.position();
            let name = match (steps.is_empty(), parser.peek()) {
                (true, Token::Ident(name)) => {
                    let name = (*name).to_owned();
                    parser.advance();
                    name
                }
                (false, Token::Dot) => {
                    parser.advance();
                    parser.field_name()?
                }
                (_, Token::LBracket) => {
                    parser.advance();
                    let Token::Str(name) = parser.peek() else {
                        return Err(parser.expected("a quoted field name"));
                    };
                    let name = name.clone();
                    parser.advance();
                    parser.expect(&Token::RBracket, "']'")?;
                    name
                }
                (true, _) => return Err(parser.expected("a field name")),
                (false, _) => break,
            };
            if steps.len() == limits.max_depth {
                return Err(FilterError::at(
                    source,
                    at,
                    Reason::TooDeep {
                        limit: limits.max_depth,
                    },
                ));
            }
            steps.push(name);
        }
        paths.push(steps);
        match parser.peek() {
            Token::Comma => parser.advance(),
            Token::End => return Ok(paths),
            _ => return Err(parser.expected("',' or the end")),
        }
    }
}

struct Parser<'s, 'l> {
    source: &'s str,
    tokens: Vec<(usize, Token<'s>)>,
    next: usize,
    limits: &'l Limits,
    depth: usize,
    terms: usize,
}

impl<'s, 'l> Parser<'s, 'l> {
    fn new(source: &'s str, limits: &'l Limits) -> Result<Self, FilterError> {
        if source.len() > limits.max_length {
            return Err(FilterError::at(
                source,
                limits.max_length,
                Reason::TooLong {
                    limit: limits.max_length,
                },
            ));
        }
        let tokens = tokenize(source)?;
        if tokens.len() == 1 {
            return Err(FilterError::at(source, source.len(), Reason::Empty));
        }
        Ok(Self {
            source,
            tokens,
            next: 0,
            limits,
            depth: 0,
            terms: 0,
        })
    }

    fn peek(&self) -> &Token<'s> {
        self.tokens
            .get(self.next)
            .map_or(&Token::End, |(_, token)| token)
    }

    fn position(&self) -> usize {
        self.tokens
            .get(self.next)
            .map_or(self.source.len(), |(at, _)| *at)
    }

    fn advance(&mut self) {
        if self.next + 1 < self.tokens.len() {
            self.next += 1;
        }
    }

    fn error(&self, reason: Reason) -> FilterError {
        FilterError::at(self.source, self.position(), reason)
    }

    fn expected(&self, expected: &'static str) -> FilterError {
        self.error(Reason::Expected {
            expected,
            found: self.peek().describe(),
        })
    }

    fn expect(&mut self, token: &Token<'_>, expected: &'static str) -> Result<(), FilterError> {
        if self.peek() == token {
            self.advance();
            Ok(())
        } else {
            Err(self.expected(expected))
        }
    }

    /// Counts one node of the tree against the limit.
    fn term(&mut self) -> Result<(), FilterError> {
        self.terms += 1;
        if self.terms > self.limits.max_terms {
            return Err(self.error(Reason::TooManyTerms {
                limit: self.limits.max_terms,
            }));
        }
        Ok(())
    }

    /// Runs `inner` one nesting level deeper, refusing to go past the limit.
    fn nested<T>(
        &mut self,
        inner: impl FnOnce(&mut Self) -> Result<T, FilterError>,
    ) -> Result<T, FilterError> {
        if self.depth == self.limits.max_depth {
            return Err(self.error(Reason::TooDeep {
                limit: self.limits.max_depth,
            }));
        }
        self.depth += 1;
        let result = inner(self);
        self.depth -= 1;
        result
    }

    /// Parses with `inner` an operand that must be able to be true or false.
    fn condition(
        &mut self,
        inner: impl FnOnce(&mut Self) -> Result<Expr, FilterError>,
    ) -> Result<Expr, FilterError> {
        let at = self.position();
        let expr = inner(self)?;
        match expr.never_boolean() {
            Some(kind) => Err(FilterError::at(
                self.source,
                at,
                Reason::NotACondition(kind),
            )),
            None => Ok(expr),
        }
    }

    fn or(&mut self) -> Result<Expr, FilterError> {
        self.joined(&Token::Or, |parser| parser.and())
    }

    fn and(&mut self) -> Result<Expr, FilterError> {
        self.joined(&Token::And, |parser| parser.relation())
    }

    /// Operands of `operator`, each a condition, joined into one node.
    fn joined(
        &mut self,
        operator: &Token<'static>,
        operand: impl Fn(&mut Self) -> Result<Expr, FilterError>,
    ) -> Result<Expr, FilterError> {
        let at = self.position();
        let first = operand(self)?;
        if self.peek() != operator {
            return Ok(first);
        }
        if let Some(kind) = first.never_boolean() {
            return Err(FilterError::at(
                self.source,
                at,
                Reason::NotACondition(kind),
            ));
        }
        let mut operands = vec![first];
        while self.peek() == operator {
            self.term()?;
            self.advance();
            operands.push(self.condition(&operand)?);
        }
        Ok(Expr::join(*operator == Token::Or, operands))
    }

    /// A unary operand, optionally related to one other.
    fn relation(&mut self) -> Result<Expr, FilterError> {
        let left = self.unary()?;
        let Some(relation) = self.relation_next() else {
            return Ok(left);
        };
        self.term()?;
        self.advance();
        let right = self.unary()?;
        if self.relation_next().is_some() {
            return Err(self.error(Reason::ChainedComparison));
        }
        Ok(Expr::Relation(relation, Box::new(left), Box::new(right)))
    }

    fn relation_next(&self) -> Option<Relation> {
        let relation = match self.peek() {
            Token::Eq => Relation::Eq,
            Token::Ne => Relation::Ne,
            Token::Lt => Relation::Lt,
            Token::Le => Relation::Le,
            Token::Gt => Relation::Gt,
            Token::Ge => Relation::Ge,
            Token::Ident("in") => Relation::In,
            _ => return None,
        };
        Some(relation)
    }

    fn unary(&mut self) -> Result<Expr, FilterError> {
        match self.peek() {
            Token::Not => {
                self.term()?;
                let operand = self.nested(|parser| {
                    parser.advance();
                    parser.condition(|parser| parser.unary())
                })?;
                Ok(Expr::Not(Box::new(operand)))
            }
            Token::Minus => {
                self.advance();
                let number = match self.peek() {
                    Token::Int(magnitude) if *magnitude <= 1 << 63 => {
                        // Within i64 by the guard; the cast keeps i64::MIN exact.
                        Number::from((*magnitude as i128).wrapping_neg() as i64)
                    }
                    Token::Int(_) => {
                        return Err(self.error(Reason::InvalidNumber("out of range")));
                    }
                    Token::Float(value) => Number::from_f64(-value)
                        .ok_or_else(|| self.error(Reason::InvalidNumber("out of range")))?,
                    _ => return Err(self.error(Reason::MinusNotNumber)),
                };
                self.term()?;
                self.advance();
                Ok(Expr::Literal(Value::Number(number)))
            }
            _ => self.member(),
        }
    }

    /// A primary, then any `.field`, `[…]` and `.method(…)` after it.
    fn member(&mut self) -> Result<Expr, FilterError> {
        let mut expr = self.primary()?;
        loop {
            match self.peek() {
                Token::Dot => {
                    self.advance();
                    let at = self.position();
                    let name = self.field_name()?;
                    if *self.peek() == Token::LParen {
                        expr = self.method(expr, &name, at)?;
                    } else {
                        self.step(&mut expr, Step::Field(name), at)?;
                    }
                }
                Token::LBracket => {
                    let at = self.position();
                    self.advance();
                    let step = match self.peek() {
                        Token::Str(name) => Step::Field(name.clone()),
                        Token::Int(index) => Step::Index(*index),
                        _ => return Err(self.expected("a quoted field name or an index")),
                    };
                    self.advance();
                    self.expect(&Token::RBracket, "']'")?;
                    self.step(&mut expr, step, at)?;
                }
                _ => return Ok(expr),
            }
        }
    }

    /// The name after a `.`: any word, keywords too (`value.in` is a field named "in").
    fn field_name(&mut self) -> Result<String, FilterError> {
        match self.peek() {
            Token::Ident(name) => {
                let name = (*name).to_owned();
                self.advance();
                Ok(name)
            }
            _ => Err(self.expected("a field name after '.'")),
        }
    }

    /// Adds a step to the path `expr`, at `at` in the source.
    fn step(&mut self, expr: &mut Expr, step: Step, at: usize) -> Result<(), FilterError> {
        let Expr::Path(path) = expr else {
            return Err(FilterError::at(
                self.source,
                at,
                Reason::Expected {
                    expected: "a path before a field or an index",
                    found: "a value".to_owned(),
                },
            ));
        };
        if let Some((name, _)) = path.root.scalar() {
            return Err(FilterError::at(self.source, at, Reason::NoFields(name)));
        }
        self.term()?;
        path.steps.push(step);
        Ok(())
    }

    /// `receiver.name(arguments)`, the `(` being next.
    fn method(&mut self, receiver: Expr, name: &str, at: usize) -> Result<Expr, FilterError> {
        self.term()?;
        let test = match name {
            "size" => None,
            _ => Some(TextTest::named(name).ok_or_else(|| {
                FilterError::at(self.source, at, Reason::UnknownFunction(name.to_owned()))
            })?),
        };
        let mut arguments = self.arguments()?;
        match (test, arguments.pop(), arguments.is_empty()) {
            (None, None, _) => Ok(Expr::Size(Box::new(receiver))),
            (Some(test), Some(argument), true) => {
                Ok(Expr::Text(test, Box::new(receiver), Box::new(argument)))
            }
            (None, ..) => Err(FilterError::at(
                self.source,
                at,
                Reason::Arguments {
                    function: "size",
                    expected: "no argument after a '.'",
                },
            )),
            (Some(test), ..) => Err(FilterError::at(
                self.source,
                at,
                Reason::Arguments {
                    function: test.name(),
                    expected: "one argument",
                },
            )),
        }
    }

    /// `( expr, … )`, the `(` being next.
    fn arguments(&mut self) -> Result<Vec<Expr>, FilterError> {
        self.expect(&Token::LParen, "'('")?;
        let mut arguments = Vec::new();
        if *self.peek() == Token::RParen {
            self.advance();
            return Ok(arguments);
        }
        loop {
            arguments.push(self.nested(|parser| parser.or())?);
            match self.peek() {
                Token::Comma => self.advance(),
                Token::RParen => {
                    self.advance();
                    return Ok(arguments);
                }
                _ => return Err(self.expected("',' or ')' after an argument")),
            }
        }
    }

    fn primary(&mut self) -> Result<Expr, FilterError> {
        let at = self.position();
        let expr = match self.peek().clone() {
            Token::Int(value) => Expr::Literal(Value::Number(Number::from(value))),
            Token::Float(value) => Expr::Literal(
                Number::from_f64(value)
                    .map(Value::Number)
                    .ok_or_else(|| self.error(Reason::InvalidNumber("out of range")))?,
            ),
            Token::Str(text) => Expr::Literal(Value::String(text)),
            Token::Ident("true") => Expr::Literal(Value::Bool(true)),
            Token::Ident("false") => Expr::Literal(Value::Bool(false)),
            Token::Ident("null") => Expr::Literal(Value::Null),
            Token::Ident(name)
                if self.tokens.get(self.next + 1).map(|(_, t)| t) == Some(&Token::LParen) =>
            {
                self.term()?;
                self.advance();
                return self.function(name, at);
            }
            Token::Ident(name) => match Root::named(name) {
                Some(root) => Expr::Path(Path {
                    root,
                    steps: Vec::new(),
                }),
                None if name == "in" => return Err(self.expected("a value")),
                None => return Err(self.error(Reason::UnknownName(name.to_owned()))),
            },
            Token::LParen => {
                return self.nested(|parser| {
                    parser.advance();
                    let inner = parser.or()?;
                    parser.expect(&Token::RParen, "')'")?;
                    Ok(inner)
                });
            }
            Token::LBracket => {
                return self.nested(|parser| {
                    parser.advance();
                    parser.list()
                });
            }
            _ => return Err(self.expected("a value")),
        };
        self.term()?;
        self.advance();
        Ok(expr)
    }

    /// `has(path)` or `size(x)`, the `(` being next.
    fn function(&mut self, name: &str, at: usize) -> Result<Expr, FilterError> {
        let function = match name {
            "has" => "has",
            "size" => "size",
            _ => {
                return Err(FilterError::at(
                    self.source,
                    at,
                    Reason::UnknownFunction(name.to_owned()),
                ));
            }
        };
        let argument_at = self.position() + 1;
        let mut arguments = self.arguments()?;
        let (Some(argument), true) = (arguments.pop(), arguments.is_empty()) else {
            return Err(FilterError::at(
                self.source,
                at,
                Reason::Arguments {
                    function,
                    expected: "one argument",
                },
            ));
        };
        if function == "size" {
            return Ok(Expr::Size(Box::new(argument)));
        }
        match argument {
            Expr::Path(path) if !path.steps.is_empty() => Ok(Expr::Has(path)),
            _ => Err(FilterError::at(
                self.source,
                argument_at,
                Reason::HasNeedsField,
            )),
        }
    }

    /// The elements of a list literal, the `[` consumed: literals only, so that a list is
    /// decoded once at compile time.
    fn list(&mut self) -> Result<Expr, FilterError> {
        let mut elements = Vec::new();
        loop {
            if *self.peek() == Token::RBracket {
                self.advance();
                break;
            }
            if elements.len() == self.limits.max_list {
                return Err(self.error(Reason::ListTooLong {
                    limit: self.limits.max_list,
                }));
            }
            let at = self.position();
            match self.unary()? {
                Expr::Literal(element) => elements.push(element),
                _ => return Err(FilterError::at(self.source, at, Reason::ListNotLiteral)),
            }
            match self.peek() {
                Token::Comma => self.advance(),
                Token::RBracket => {}
                _ => return Err(self.expected("',' or ']' in a list")),
            }
        }
        self.term()?;
        Ok(Expr::Literal(Value::Array(elements)))
    }
}
