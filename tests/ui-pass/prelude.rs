//! One import serves a task file: no unused-import warning whatever it uses,
//! `yield_request!` in other macros' arguments, a helper that sends with the
//! context, an error type of the task's own, `.or_fail`, `?` on a
//! `serde_json::Error`.
#![deny(warnings)]

use dispatcher::prelude::*;

#[derive(Debug)]
enum Mine {
    Empty,
}

impl From<Mine> for TaskError {
    fn from(_: Mine) -> TaskError {
        TaskError::failed("empty", "nothing to say")
    }
}

impl From<RequestError> for Mine {
    fn from(_: RequestError) -> Mine {
        Mine::Empty
    }
}

async fn helper(ctx: &TaskContext, question: String) -> Result<String, RequestError> {
    Ok(ctx.send(Request::chat().user(question)).await?.text().to_string())
}

#[task]
async fn ask(input: String, ctx: TaskContext) -> Result<Vec<String>, TaskError> {
    let (a, b) = tokio::join!(helper(&ctx, input.clone()), helper(&ctx, input.clone()));
    let first = format!("{} {}", yield_request!(Request::chat().user(&input))?.text(), a?);
    let n: u32 = b?.len().to_string().parse().or_fail("not_a_number")?;
    // `?` on serde_json's error fails the line as `json_error`.
    let _parsed: Vec<u32> = serde_json::from_str(&input)?;
    Ok(vec![first, n.to_string()])
}

#[task]
async fn own_error(input: String) -> Result<String, Mine> {
    let r = yield_request!(Request::completion(input))?;
    if r.text().is_empty() {
        return Err(Mine::Empty);
    }
    Ok(r.text().to_string())
}

fn main() {
    let _tasks: [&'static dyn dispatcher::DynTask; 2] = [&ask, &own_error];
}
