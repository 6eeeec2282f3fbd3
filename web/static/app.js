// Progressive enhancement only: every action here is also a plain form.
// Keyboard shortcuts over the list of products, and the category type-ahead.
(function () {
  "use strict";

  function items() {
    return Array.from(document.querySelectorAll(".item"));
  }

  function focusItem(index) {
    const list = items();
    if (!list.length) return;
    const item = list[Math.max(0, Math.min(index, list.length - 1))];
    item.focus();
    item.scrollIntoView({ block: "nearest" });
  }

  function currentItem() {
    const active = document.activeElement;
    return active && active.closest ? active.closest(".item") : null;
  }

  document.addEventListener("keydown", function (event) {
    if (event.ctrlKey || event.metaKey || event.altKey) return;
    const target = event.target;
    if (target.matches && target.matches("input, select, textarea")) {
      if (event.key === "Escape") {
        const item = currentItem();
        if (item) item.focus();
      }
      return;
    }
    const list = items();
    const item = currentItem() || list[0];
    const index = list.indexOf(item);
    if (event.key === "j") {
      focusItem(index + 1);
    } else if (event.key === "k") {
      focusItem(index - 1);
    } else if (/^[1-9]$/.test(event.key) && item) {
      const button = item.querySelector('button[data-key="' + event.key + '"]');
      if (!button) return;
      button.click();
    } else if (event.key === "/" && item) {
      item.querySelector("input[list]").focus();
    } else {
      return;
    }
    event.preventDefault();
  });

  const options = document.getElementById("category-options");
  if (options) {
    let timer = null;
    document.addEventListener("input", function (event) {
      if (!event.target.matches('input[list="category-options"]')) return;
      const query = event.target.value;
      clearTimeout(timer);
      timer = setTimeout(async function () {
        const response = await fetch("/categories.json?q=" + encodeURIComponent(query), {
          credentials: "same-origin",
        });
        if (!response.ok) return;
        const names = await response.json();
        options.replaceChildren(
          ...names.map(function (name) {
            const option = document.createElement("option");
            option.value = name;
            return option;
          })
        );
      }, 120);
    });
  }

  if (items().length) focusItem(0);
})();
