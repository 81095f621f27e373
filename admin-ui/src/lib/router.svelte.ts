/** The page shown, from the URL path (the admin service answers every UI path with the app). */
export const route = $state({ path: location.pathname });

export function go(path: string): void {
  if (path !== location.pathname) history.pushState(null, "", path);
  route.path = path;
}

addEventListener("popstate", () => {
  route.path = location.pathname;
});
