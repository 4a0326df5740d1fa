//! The expansion compiles without a single warning, with a context, with a
//! custom crate path, and used as a task.
#![deny(warnings)]

use dispatcher::{task, Request, Task, TaskContext, TaskError};

mod reexport {
    pub use dispatcher::*;
}

/// Documented tasks keep their docs.
#[task]
pub async fn with_context(input: String, ctx: TaskContext) -> Result<String, TaskError> {
    let r = yield_request!(Request::chat().user(&input))?;
    yield_request!(Request::completion("statement position"))?;
    Ok(format!("{} {}", ctx.work_id(), r.text()))
}

#[task(crate = reexport)]
async fn through_reexport(input: Vec<u32>) -> Result<u32, TaskError> {
    let [a, b] = yield_request!([Request::completion("a"), Request::completion("b")])?;
    Ok(input.len() as u32 + a.text().len() as u32 + b.text().len() as u32)
}

fn main() {
    assert_eq!(<with_context as Task>::NAME, "with_context");
    assert_eq!(<through_reexport as Task>::NAME, "through_reexport");
    let _tasks: [&'static dyn dispatcher::DynTask; 2] = [&with_context, &through_reexport];
}
