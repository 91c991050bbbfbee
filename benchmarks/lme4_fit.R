# lme4 peer for the mixedscale benchmarks:
#   Rscript lme4_fit.R DATA SPECS OUT KEY
# DATA: a CSV (or Parquet, when the arrow package is installed) of the slices to fit;
# SPECS: a CSV with columns spec, formula, reml (lme4 formulas, e.g. y ~ x + (1 + x | g));
# OUT: a CSV of long records key, spec, term, value, seconds, status, where
# term "__llf__" holds logLik(). Exit status 3 when lme4 is not installed.
args <- commandArgs(trailingOnly = TRUE)
if (length(args) != 4) {
  message("usage: Rscript lme4_fit.R DATA SPECS OUT KEY")
  quit(status = 2)
}
data_path <- args[[1]]
specs_path <- args[[2]]
out_path <- args[[3]]
key <- args[[4]]

if (!requireNamespace("lme4", quietly = TRUE)) {
  message("lme4 is not installed")
  quit(status = 3)
}

t_read <- system.time({
  if (grepl("\\.parquet$", data_path) && requireNamespace("arrow", quietly = TRUE)) {
    d <- as.data.frame(arrow::read_parquet(data_path))
  } else if (requireNamespace("data.table", quietly = TRUE)) {
    d <- as.data.frame(data.table::fread(data_path))
  } else {
    d <- read.csv(data_path, stringsAsFactors = FALSE)
  }
})[["elapsed"]]
specs <- read.csv(specs_path, stringsAsFactors = FALSE)

pieces <- split(d, d[[key]], drop = TRUE)
rows <- vector("list", length(pieces) * nrow(specs))
i <- 0L
t_fit <- system.time({
  for (k in names(pieces)) {
    sub <- pieces[[k]]
    for (j in seq_len(nrow(specs))) {
      t0 <- proc.time()[["elapsed"]]
      m <- tryCatch(
        suppressMessages(suppressWarnings(
          lme4::lmer(stats::as.formula(specs$formula[[j]]), data = sub,
                     REML = as.logical(specs$reml[[j]])))),
        error = function(e) e)
      dt <- proc.time()[["elapsed"]] - t0
      i <- i + 1L
      if (inherits(m, "error")) {
        rows[[i]] <- data.frame(key = k, spec = specs$spec[[j]], term = "__error__",
                                value = NA_real_, seconds = dt,
                                status = paste("error:", conditionMessage(m)))
        next
      }
      conv <- m@optinfo$conv$lme4
      status <- if (length(conv$messages) == 0) "ok" else "not_converged"
      fe <- lme4::fixef(m)
      rows[[i]] <- data.frame(key = k, spec = specs$spec[[j]],
                              term = c(names(fe), "__llf__"),
                              value = c(unname(fe), as.numeric(stats::logLik(m))),
                              seconds = dt, status = status)
    }
  }
})[["elapsed"]]
out <- do.call(rbind, rows[seq_len(i)])
write.csv(out, out_path, row.names = FALSE)
cat(sprintf("read_seconds=%.3f fit_seconds=%.3f fits=%d\n", t_read, t_fit, i))
